"""The wheel installs only our top-level names: the application package, the PSA package and the
two modules the brief names (no generic `media`, `errors`, `tools` ... in site-packages)."""
import sys
import zipfile

ALLOWED = {"qwen_vl_psa", "psa_paddle", "infer_qwen2_5_vl_psa.py", "qwen2_5_vl_psa_attention.py"}

names = zipfile.ZipFile(sys.argv[1]).namelist()
top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
if top != ALLOWED:
    sys.exit(f"wheel top-level names {sorted(top)} != {sorted(ALLOWED)}")
print("wheel top-level names:", ", ".join(sorted(top)))
