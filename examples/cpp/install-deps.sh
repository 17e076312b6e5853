#!/usr/bin/env bash
# Installs what examples/cpp needs to build on Debian/Ubuntu: CMake, g++, libjpeg-turbo, libpng
# and nlohmann-json (OpenVINO's SDK comes with the openvino Python wheel; TensorRT and CUDA are
# not installed here). A no-op when everything is already present; needs root (or sudo) otherwise.
set -euo pipefail

packages=(cmake g++ make libjpeg-dev libpng-dev nlohmann-json3-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "examples/cpp: missing ${missing[*]} and no apt-get here: install them with your package manager" >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "examples/cpp: installing ${missing[*]}" >&2
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
