"""Run SAELens itself on SAE directories, for ``tests/test_saelens.py`` (not a dependency).

Runs under a Python that has ``sae-lens`` installed (a throwaway virtual environment: it pulls
TransformerLens, transformers, datasets, … — about 100 packages — so the plugin's CI does not
install it), and imports nothing from ScalarLens::

    python saelens_reference.py INPUTS.safetensors OUT.safetensors DIR [DIR ...]

For each ``DIR`` (SAELens layout) it loads ``SAE.load_from_disk(DIR)`` and writes
``{i}.latents`` = ``sae.encode(x)`` and ``{i}.reconstruction`` = ``sae.decode(latents)`` for
the tensor ``x`` of ``INPUTS``; an SAE SAELens cannot load is reported as ``{i}.error`` (a
one-element tensor) with the message on stderr.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file


def main(argv: list[str]) -> int:
    inputs, out, *directories = argv
    x = load_file(inputs)["x"]
    from sae_lens import SAE

    results: dict[str, torch.Tensor] = {}
    for i, directory in enumerate(directories):
        try:
            sae = SAE.load_from_disk(directory, device="cpu")
            with torch.no_grad():
                latents = sae.encode(x.to(sae.dtype))
                results[f"{i}.latents"] = latents.contiguous()
                results[f"{i}.reconstruction"] = sae.decode(latents).contiguous()
        except Exception as exc:  # report and go on: the test says which SAE SAELens refused
            print(f"{directory}: {type(exc).__name__}: {exc}", file=sys.stderr)
            results[f"{i}.error"] = torch.zeros(1)
    save_file(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
