#!/usr/bin/env bash
# Run HERE (not on the device) before scripts/gpu/run_all.sh: fills the git-ignored .gpu/ and .whl/
# that travel with the device call (carry [".whl", ".gpu"]). Needs `usf-bios demo` (or import-gguf) once,
# so that SmolLM2's config and tokenizer are on disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
model="${USF_MODEL_PATH:-${USF_HOME:-$HOME/.usf-bios}/models}/HuggingFaceTB--SmolLM2-135M-Instruct"
mkdir -p .gpu/smollm2-config .whl
for f in config.json tokenizer.json tokenizer_config.json chat_template.jinja generation_config.json; do
  cp "$model/$f" .gpu/smollm2-config/
done
python3 -c "from usf_bios.demo import write_fact_dataset; from pathlib import Path; write_fact_dataset(Path('.gpu/demo-velmora.jsonl'))"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-dotenv==1.2.4 typing-extensions==4.16.0 bitsandbytes==0.50.2
du -sh .whl .gpu
