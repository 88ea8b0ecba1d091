"""MGM's text-to-image path (spec mgm.md section 5): a user turn ending in `` <GEN>`` asks the model for a
text-to-image prompt, which it writes inside ``<h>…</h>``; that prompt goes to a pluggable backend, by default a
``diffusers`` pipeline (SDXL-base in MGM; any local pipeline directory works), and the image is saved beside the
answer. ``<GEN>``, ``<h>`` and ``</h>`` are plain text, not special tokens.

The backend needs the optional ``gen`` extra (``pip install -e ".[gen]"``); nothing is downloaded: the pipeline
is read from a local directory, safetensors only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from PIL import Image

GEN = "<GEN>"
# MGM passes a fixed negative prompt of common artefacts; this list is ours, written to the same purpose.
NEGATIVE_PROMPT = (
    "out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, "
    "duplicate, morbid, mutilated, extra fingers, mutated hands, poorly drawn hands, poorly drawn "
    "face, deformed, blurry, bad anatomy, bad proportions, extra limbs, disfigured, watermark, "
    "signature, username"
)

TextToImage = Callable[[str], Image.Image]


def ask_for_image(text: str) -> str:
    """A user turn asking for an image, as MGM's CLI writes it (" <GEN>" appended)."""
    return f"{text} {GEN}"


def image_prompt(answer: str) -> str | None:
    """The text-to-image prompt of an answer: the last ``<h>…</h>`` pair, as MGM's CLI takes it (its gradio worker
    takes the first); None unless both tags are there."""
    if "<h>" not in answer or "</h>" not in answer:
        return None
    before_last_close = answer.rsplit("</h>", 1)[0]
    return before_last_close.rsplit("<h>", 1)[-1].strip() if "<h>" in before_last_close else None


class DiffusersBackend:
    """A local ``diffusers`` pipeline as a ``TextToImage``: MGM calls SDXL with its defaults (50 steps, guidance
    5.0, 1024 pixels) and its negative prompt; ``seed`` fixes the noise (MGM's is random)."""

    def __init__(
        self,
        path: str | Path,
        *,
        steps: int = 50,
        guidance: float = 5.0,
        size: int | None = None,
        seed: int | None = None,
        dtype: str = "float32",
    ):
        import diffusers  # noqa: PLC0415  (the optional extra)
        import torch  # noqa: PLC0415

        self.torch = torch
        self.pipe = diffusers.DiffusionPipeline.from_pretrained(
            path, torch_dtype=getattr(torch, dtype), use_safetensors=True, local_files_only=True
        )
        if torch.cuda.is_available():
            self.pipe = self.pipe.to("cuda")
        self.steps, self.guidance, self.size, self.seed = steps, guidance, size, seed

    def __call__(self, prompt: str) -> Image.Image:
        generator = None if self.seed is None else self.torch.Generator().manual_seed(self.seed)
        size = {} if self.size is None else {"height": self.size, "width": self.size}
        return self.pipe(
            prompt,
            negative_prompt=NEGATIVE_PROMPT,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=generator,
            **size,
        ).images[0]


def imagine(answer: str, backend: TextToImage, out_dir: str | Path, stem: str) -> Path | None:
    """The answer's image, drawn by ``backend`` and saved as ``out_dir/stem.png``; None when it holds no prompt."""
    prompt = image_prompt(answer)
    if prompt is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.png"
    backend(prompt).save(path)
    path.with_suffix(".txt").write_text(prompt + "\n")
    return path
