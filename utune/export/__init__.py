"""Exporting tuned models: merged plain weights, tuner-only files, PEFT LoRA folders.

- :func:`merged_state_dict` / :func:`export_merged`: every tuner folded into the base weights, keyed like
  the plain backbone (``utune export --merge``);
- :func:`export_tuners` / :func:`load_tuners`: only what training changed, keyed by site names, with the
  spec and a base-weights fingerprint (``utune export --tuners-only``; ``utune apply SPEC --tuners FILE``);
- :func:`export_peft`: a Hugging Face PEFT LoRA folder (``utune export --format peft``);
"""

from utune.export.merge import MergeResult, Verification, merged_state_dict, verify_merged
from utune.export.peft_format import export_peft, peft_adapter
from utune.export.run import export, export_merged
from utune.export.tuners_only import base_fingerprint, export_tuners, load_tuners, read_tuners, tuner_state

__all__ = [
    "MergeResult",
    "Verification",
    "base_fingerprint",
    "export",
    "export_merged",
    "export_peft",
    "export_tuners",
    "load_tuners",
    "merged_state_dict",
    "peft_adapter",
    "read_tuners",
    "tuner_state",
    "verify_merged",
]
