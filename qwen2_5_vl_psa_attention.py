"""PSA in the Qwen2.5-VL language model's prefill attention: `apply_psa(model, cfg)`, `remove_psa(model)`.

The implementation is qwen_vl_psa/psa_router.py; this module keeps the name the project has always had.
"""
from qwen_vl_psa.psa_router import PSAState, apply_psa, install_router, remove_psa, reusable_prefix, router  # noqa: F401
