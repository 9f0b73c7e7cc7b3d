"""fp32 where it is promised, also inside a caller's autocast region; compile-clean gradient checkpointing."""
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run_args
from references import brute_force_knn_scores, naive_nt_xent
from simclr import engine
from simclr.engine import cpu_has_native_bf16
from simclr.knn import knn_scores, nearest_neighbors
from simclr.names import RUN_FILES
from simclr.pretrain import precision_note
from simclr.model import SimCLR, nt_xent


def bf16_autocast():
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


def test_nt_xent_inside_autocast_is_the_fp32_value():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 32, generator=g)
    exact = naive_nt_xent(z[:32], z[32:], 0.1).item()
    with bf16_autocast():
        inside = nt_xent(z, 0.1)
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(exact, rel=1e-6)


def test_knn_scores_inside_autocast_equal_the_fp32_scores():
    g = torch.Generator().manual_seed(1)
    bank, test = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 5, (300,), generator=g)
    outside = knn_scores(test, bank, labels, 5, 20, 0.1)
    with bf16_autocast():
        inside = knn_scores(test, bank, labels, 5, 20, 0.1)   # used to fail: bf16 weights into an fp32 scatter
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    # and they are the right scores, not only the same wrong ones: the float64 brute force
    want = torch.tensor(brute_force_knn_scores(test, bank, labels, 5, 20, 0.1), dtype=torch.float64)
    torch.testing.assert_close(inside.double(), want, rtol=1e-5, atol=1e-6)


def test_neighbour_search_inside_autocast_finds_the_fp32_neighbours():
    g = torch.Generator().manual_seed(2)
    bank, query = torch.randn(500, 32, generator=g), torch.randn(50, 32, generator=g)
    idx_out, sim_out = nearest_neighbors(query, bank, 5)
    with bf16_autocast():
        idx_in, sim_in = nearest_neighbors(query, bank, 5)
    assert torch.equal(idx_in, idx_out) and sim_in.dtype == torch.float32
    # and the reference: brute force in float64
    sims = F.normalize(query.double(), dim=1) @ F.normalize(bank.double(), dim=1).T
    assert torch.equal(idx_out, sims.topk(5, dim=1).indices)


def test_nt_xent_masks_the_diagonal_without_a_host_tensor():
    # the mask is a scalar argument of masked_fill: a CPU tensor copied to the GPU every step would sync
    z = torch.randn(8, 4, requires_grad=True)
    loss = nt_xent(z, 0.5)
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_compiled_grad_checkpoint_has_no_graph_breaks_and_updates_batchnorm_once():
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    plain = SimCLR("resnet18", feature_dim=8, proj_hidden_dim=16)
    ckpt = SimCLR("resnet18", feature_dim=8, proj_hidden_dim=16, grad_checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    explained = torch._dynamo.explain(copy.deepcopy(ckpt))(x)  # it runs the model: on a copy
    assert explained.graph_break_count == 0, explained.break_reasons
    # each of the 8 residual blocks stays a checkpointed region in the graph (a wrapper with side effects
    # made dynamo inline the blocks instead: no break, but no checkpointing and no memory saved either)
    code = "\n".join(graph.code for graph in explained.graphs)
    assert code.count("tag_activation_checkpoint(") >= 8
    torch._dynamo.reset()
    compiled = torch.compile(ckpt, backend="aot_eager")
    for model in (plain, compiled):
        nt_xent(model(x)[1], 0.5).backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), name
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-3), name


AMD_ZEN4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
INTEL_SPR = "flags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
OLD_CPU = "flags\t\t: fpu sse2 avx2 fma\n"


def test_native_bf16_is_read_from_the_cpu_flags():
    assert cpu_has_native_bf16(AMD_ZEN4, {}) and cpu_has_native_bf16(INTEL_SPR, {})
    assert not cpu_has_native_bf16(OLD_CPU, {}) and not cpu_has_native_bf16("", {})


def test_a_kernel_isa_cap_below_bf16_makes_the_cpu_count_as_one_without_it():
    assert not cpu_has_native_bf16(INTEL_SPR, {"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert not cpu_has_native_bf16(AMD_ZEN4, {"DNNL_MAX_CPU_ISA": "avx512_core_vnni"})
    assert cpu_has_native_bf16(INTEL_SPR, {"ONEDNN_MAX_CPU_ISA": "avx512_core_amx"})
    assert cpu_has_native_bf16(AMD_ZEN4, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"})
    # ATen's own cap leaves oneDNN's convolutions on the bf16 units
    assert cpu_has_native_bf16(INTEL_SPR, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": ""})
    assert not cpu_has_native_bf16(OLD_CPU, {"ONEDNN_MAX_CPU_ISA": "ALL"})


def test_auto_precision_reads_the_isa_cap_from_the_environment(tmp_path):
    import subprocess
    import sys
    code = ("import torch; from simclr.engine import resolve_precision; "
            "print(resolve_precision('auto', torch.device('cpu')))")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "fp32"


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert engine.resolve_precision("auto", torch.device("cpu")) == expected
    assert engine.resolve_precision("fp32", torch.device("cpu")) == "fp32"  # an explicit choice stands


def test_a_tiny_run_records_and_says_the_precision_it_chose(tiny_folder, tmp_path, capsys):
    import json
    import main
    assert main.main(tiny_run_args(tiny_folder, tmp_path, "p", batch_size=16)) == 0
    chosen = json.loads((tmp_path / "p_config.json").read_text())["precision"]
    assert chosen == ("bf16" if cpu_has_native_bf16() else "fp32")
    out = capsys.readouterr().out
    assert f"precision: {chosen} (auto:" in out
    last = torch.load(tmp_path / "p_last.pth", weights_only=True)
    assert last["config"]["precision"] == chosen  # the checkpoint holds the same resolved config
    # the closing line names every file the run wrote (the lock file is hidden, not a result)
    done = [line for line in out.splitlines() if line.startswith("done:")][-1]
    named = {os.path.basename(p) for p in done.split("files ", 1)[1].split(", ")}
    assert named == {p for p in os.listdir(tmp_path) if not p.startswith(".")}, done
    assert named == {f"p_{kind}" for kind in RUN_FILES}


@pytest.mark.parametrize("precision,device,hint", [("bf16", "cpu", True), ("fp32", "cpu", False),
                                                   ("bf16", "cuda", True), ("fp16", "cuda", True)])
def test_the_precision_note_offers_fp32_only_when_it_is_not_fp32(precision, device, hint):
    note = precision_note(precision, device)
    assert note.startswith(f"precision: {precision} (auto: ")
    assert ("--precision fp32" in note) == hint, note
