"""The TensorRT backend: the runtime interface of the ONNX Runtime backend, on an engine.

Running uses Polygraphy's TrtRunner, selecting the optimization profile that matches the step.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sa_export.core.errors import EngineBuildError, EnvironmentProblem
from sa_export.runtime.base import ManifestModel
from targets.engine import ENGINE_NAME, import_tensorrt


class TRTModel(ManifestModel):
    """An engine in OUT, stepped like SAModel."""

    backend = "tensorrt"

    def __init__(self, out_dir: str | Path):
        import_tensorrt()
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError:
            raise EnvironmentProblem("running engines needs Polygraphy: pip install 'sa-export[tensorrt]'") from None

        super().__init__(out_dir)
        engine_path = self.out_dir / ENGINE_NAME
        if not engine_path.is_file():
            raise EnvironmentProblem(f"{engine_path} is missing: build it on the target with `sa-export build-engine {self.out_dir}`")
        self.runner = TrtRunner(EngineFromBytes(engine_path.read_bytes()))
        self.runner.activate()
        self.profile = None

    def empty_cache(self, batch: int, capacity: int | None = None) -> dict[str, np.ndarray]:
        """In-place buffers hold exactly the capacity the engine's profiles fix (the manifest's max_length)."""
        return super().empty_cache(batch, self.max_length if self.shared_buffer else capacity)

    def forward(self, input_ids, attention_mask, cache):
        past = attention_mask.shape[1] - input_ids.shape[1]  # in-place buffers hold their capacity: ask the mask
        profile = 0 if past == 0 else 1  # prefill, decode (targets.shapes order)
        if profile == 1 and input_ids.shape[1] != 1:
            raise EngineBuildError("the engine's decode profile takes one token per step after the prefill")
        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        feeds = self.feeds(input_ids, attention_mask, cache)
        outputs = {k: np.asarray(v) for k, v in self.runner.infer(feeds, copy_outputs_to_host=True).items()}
        return outputs["logits"], self.next_cache(outputs), outputs
