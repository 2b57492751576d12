"""Runtime-neutral standard ONNX, for TVM, OpenVINO and other runtimes graphopt does not model.

It emits default-domain ops that exist at the model's opset and nothing else: no com.microsoft
or other contrib domain, whatever the installed onnxruntime has. graphopt still verifies the
result with onnxruntime's CPU provider, so the opset bound (`max_opset`) stays onnxruntime's.
"""

from graphopt.targets import Target

TARGET = Target(
    name="generic",
    description="standard ONNX only, for any runtime (TVM, OpenVINO, ...); verified with onnxruntime CPU",
    triple="",
    runtime="any",
    execution_providers=(),
)
