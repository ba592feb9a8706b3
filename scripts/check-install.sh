#!/usr/bin/env bash
# Proves the packaging claim end to end:
#  1. build the sdist and the wheel (isolated build: the declared build-system requirements);
#  2. the wheel's metadata requires no host framework unconditionally, LICENSE is in both, and
#     the wheel holds every module of green_mlops/, plugins/ and integrations/;
#  3. a fresh venv gets `pip install "<wheel>[mlflow]"`: mlflow-skinny, not mlflow, no torch;
#  4. a tracking server (full mlflow, from $PYTHON's environment) on 127.0.0.1, and a plain MLflow
#     script run in the fresh venv with GREEN_MLOPS_ENABLE=1: the run gets green/energy_kwh.
# Needs PyPI (for the build requirements and the fresh venv). PYTHON: an environment with full
# mlflow and `build` (the development install, `make install`). KEEP=1 keeps the work folder.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$root/.venv/bin/python}"
work="$(mktemp -d "${TMPDIR:-/tmp}/green-mlops-check-install.XXXXXX")"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then
    kill -- "-$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "check-install: work folder kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
say() { echo "check-install: $*"; }
fail() {
  echo "check-install: FAILED: $*" >&2
  exit 1
}

say "building the sdist and the wheel"
"$PYTHON" -m build --outdir "$work/dist" "$root" >"$work/build.log" 2>&1 || {
  tail -30 "$work/build.log" >&2
  fail "python -m build (log above)"
}
wheel="$(ls "$work"/dist/*.whl)"
sdist="$(ls "$work"/dist/*.tar.gz)"
say "built $(basename "$wheel") and $(basename "$sdist")"

"$PYTHON" - "$root" "$wheel" "$sdist" <<'EOF' || fail "the wheel's contents or metadata (above)"
import sys, tarfile, zipfile
from email.parser import Parser
from pathlib import Path

root, wheel, sdist = Path(sys.argv[1]), zipfile.ZipFile(sys.argv[2]), tarfile.open(sys.argv[3])
names = set(wheel.namelist())
info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
meta = Parser().parsestr(wheel.read(f"{info}/METADATA").decode())
problems = []
# every requirement without an `extra == ...` marker is installed by plain `pip install`
unconditional = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
heavy = ("mlflow", "lightning", "pytorch-lightning", "torch", "matplotlib", "nvidia-ml-py")
for req in unconditional:
    name = req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0]
    if name.strip().lower().replace("_", "-") in heavy + ("mlflow-skinny",):
        problems.append(f"required unconditionally: {req}")
print("check-install: unconditional requirements:", ", ".join(unconditional))
print("check-install: extras:", ", ".join(meta.get_all("Provides-Extra") or []))
if meta.get("License-Expression") != "Apache-2.0":
    problems.append(f"License-Expression is {meta.get('License-Expression')!r}")
if f"{info}/licenses/LICENSE" not in names:
    problems.append("LICENSE is not in the wheel")
if not any(m.name.endswith("/LICENSE") and m.name.count("/") == 1 for m in sdist.getmembers()):
    problems.append("LICENSE is not in the sdist")
# the installed layout: green_mlops/ as is, plugins/ and integrations/ mapped into it
layout = {"green_mlops": "green_mlops", "plugins": "green_mlops/plugins",
          "integrations": "green_mlops/integrations"}
for folder, target in layout.items():
    for path in (root / folder).rglob("*"):
        if path.suffix in (".py", ".typed", ".csv", ".json") and "__pycache__" not in path.parts:
            inside = f"{target}/{path.relative_to(root / folder).as_posix()}"
            if inside not in names:
                problems.append(f"not in the wheel: {folder}/{path.relative_to(root / folder)}")
for problem in problems:
    print(f"check-install: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
say "wheel metadata: no host framework required unconditionally; LICENSE in wheel and sdist"

say "fresh venv: pip install \"$(basename "$wheel")[mlflow]\""
"$PYTHON" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$venv_python" -m pip install --quiet --upgrade pip >"$work/pip.log" 2>&1 || true
"$venv_python" -m pip install --quiet "$wheel[mlflow]" >>"$work/pip.log" 2>&1 || {
  tail -30 "$work/pip.log" >&2
  fail "pip install [mlflow] (log above)"
}
"$venv_python" - <<'EOF' || fail "the fresh venv holds more than [mlflow] asks for"
import sys
from importlib.metadata import PackageNotFoundError, distribution, distributions

have = {d.metadata["Name"].lower() for d in distributions()}
bad = sorted(have & {"mlflow", "torch", "lightning", "pytorch-lightning", "matplotlib"})
print(f"check-install: fresh venv: {len(have)} distributions, "
      f"mlflow-skinny {distribution('mlflow-skinny').version}, "
      f"green-mlops {distribution('green-mlops').version}")
if bad:
    print(f"check-install: installed though not asked for: {', '.join(bad)}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
du -sh "$work/venv" | awk '{print "check-install: fresh venv size: " $1}'

port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
say "tracking server (full mlflow from $PYTHON) on $url"
setsid "$PYTHON" -m mlflow server --host 127.0.0.1 --port "$port" \
  --backend-store-uri "sqlite:///$work/server.db" --artifacts-destination "$work/artifacts" \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  if "$PYTHON" -c "import urllib.request as u; u.urlopen('$url/health', timeout=1)" 2>/dev/null; then
    break
  fi
  kill -0 "$server_pid" 2>/dev/null || {
    cat "$work/server.log" >&2
    fail "the tracking server exited"
  }
  sleep 0.5
done

say "GREEN_MLOPS_ENABLE=1: a plain MLflow script in the fresh venv"
run_id="$(cd "$work" && env GREEN_MLOPS_ENABLE=1 MLFLOW_TRACKING_URI="$url" \
  GREEN_MLOPS_CACHE_DIR="$work/cache" "$venv_python" -c '
import time, mlflow
mlflow.set_experiment("check-install")
with mlflow.start_run() as run:
    for step in range(5):
        sum(i * i for i in range(200_000))
        mlflow.log_metric("loss", 1 / (step + 1), step=step)
        time.sleep(0.2)
print(run.info.run_id)
' 2>"$work/run.log" | tail -1)" || {
  cat "$work/run.log" >&2
  fail "the MLflow script in the fresh venv"
}
sed 's/^/check-install:   script stderr: /' "$work/run.log" | tail -5

"$PYTHON" - "$url" "$run_id" <<'EOF' || fail "the run has no green-mlops numbers"
import sys
from mlflow.tracking.client import MlflowClient

run = MlflowClient(sys.argv[1]).get_run(sys.argv[2])
metrics, tags = run.data.metrics, run.data.tags
green = sorted(k for k in metrics if k.startswith("green/"))
print(f"check-install: run {sys.argv[2]}: {len(green)} green metrics, "
      f"green/energy_kwh={metrics.get('green/energy_kwh')}, meters={tags.get('green.meters')!r}")
sys.exit(0 if metrics.get("green/energy_kwh", 0) > 0 else 1)
EOF

say "doctor in the fresh venv (extras)"
"$work/venv/bin/green-mlops" doctor --sample 0 2>&1 | sed -n '/^Extras:/,/^ *plot:/p' | sed 's/^/check-install:   /'
say "OK"
