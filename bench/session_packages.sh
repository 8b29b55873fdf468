# Sourced by the GPU session scripts (needs $PY and $REPO): install the wheels in .whl/ that the
# machine's Python lacks into /tmp/site, and put that and the repository on PYTHONPATH.
if ls .whl/*.whl >/dev/null 2>&1; then
  missing=$($PY - <<'PYEOF'
import importlib.util as u, glob, os
mods = {"xxhash": "xxhash", "pyyaml": "yaml", "pytest": "pytest", "pluggy": "pluggy",
        "iniconfig": "iniconfig", "packaging": "packaging"}
need = [w for w in glob.glob(".whl/*.whl")
        if (m := mods.get(os.path.basename(w).split("-")[0].lower())) and u.find_spec(m) is None]
print(" ".join(need))
PYEOF
)
  if [ -n "$missing" ]; then
    echo "installing: $missing"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $missing
  fi
fi
export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
