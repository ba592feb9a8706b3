#!/usr/bin/env bash
# mypy --strict on the package as it is installed: green_mlops.plugins and
# green_mlops.integrations live in plugins/ and integrations/ (setuptools package-dir), which mypy
# cannot map by itself, so it checks a tree of symlinks with the installed layout.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tree="$root/build/typecheck"
rm -rf "$tree"
mkdir -p "$tree/green_mlops"
for entry in "$root"/green_mlops/*; do
  ln -s "$entry" "$tree/green_mlops/$(basename "$entry")"
done
ln -s "$root/plugins" "$tree/green_mlops/plugins"
ln -s "$root/integrations" "$tree/green_mlops/integrations"
cd "$tree"
exec "${MYPY:-mypy}" --config-file "$root/pyproject.toml" -p green_mlops
