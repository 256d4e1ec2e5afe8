"""Exported policies: a model holding a RunningNorm, in eval mode, through torch.jit.trace and
script, torch.export and torch.onnx.export (dynamo and TorchScript-based), run without fastnorm
(ONNX Runtime; a fresh process where fastnorm cannot be imported; a graph of aten ops only) and
compared with the eager module, non-finite inputs included. Exporting an update is an error."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastnorm
from fastnorm import export
from fastnorm import RunningNorm
from helpers import DTYPES, Y_TOL, randn

SHAPE = (4, 8)
CLIP = 3.0
MIN_STD = 0.05
F32 = Y_TOL[torch.float32]


class Policy(nn.Module):
    """Normalized observations and the actions of a linear layer on them."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm
        self.head = nn.Linear(SHAPE[0] * SHAPE[1], 3)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        obs_n = self.norm(obs)
        return obs_n, self.head(obs_n.flatten(1))


def column_data(batch: int, gen: torch.Generator) -> torch.Tensor:
    """Observations (batch, 4, 8) whose columns differ in scale by 10^6; the last column sits at
    1e4 with a spread far below min_std, so its divisor is the floor and |mean| / divisor is 2e5."""
    x = randn((batch, *SHAPE), gen, dtype=torch.float64) * torch.logspace(-2, 2, SHAPE[1], dtype=torch.float64)
    x[..., -1] = 1e4 + 1e-3 * x[..., -1]
    return x.float()


def trained_policy(gen: torch.Generator, norm_class=RunningNorm) -> Policy:
    policy = Policy(norm_class(SHAPE, min_std=MIN_STD, clip=CLIP))
    for _ in range(4):
        policy.norm(column_data(64, gen))
    return policy.eval()


def test_inputs(gen: torch.Generator, batch: int = 32) -> torch.Tensor:
    """Fresh observations: some far beyond clip, a NaN, +inf and -inf in one row each."""
    x = column_data(batch, gen)
    x[1:4] *= 50.0
    x[4, 0, 1], x[5, 2, 3], x[6, 3, 0] = float("nan"), float("inf"), -float("inf")
    return x


test_inputs.__test__ = False  # a data maker, not a test


def check_preconditions(policy: Policy, x: torch.Tensor) -> None:
    """The comparison means something only if the floor and the clamp are both active."""
    divisor = policy.norm._divisor()
    assert (divisor == MIN_STD).any() and (divisor > MIN_STD).any()
    y = policy.norm(x)
    assert (y[torch.isfinite(x)].abs() == CLIP).any()


def assert_like_eager(outputs, expected, dtype=torch.float32) -> None:
    """outputs (obs_n, actions) against the eager module's: NaN where it has NaN, +-clip where +-inf."""
    for got, want in zip(outputs, expected, strict=True):
        got = torch.as_tensor(got)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, equal_nan=True, **Y_TOL[dtype])


def eager_outputs(policy: Policy, x: torch.Tensor):
    with torch.no_grad():
        return policy(x)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_torch_export_holds_aten_ops_only(gen, strict):
    policy = trained_policy(gen)
    x = test_inputs(gen)
    check_preconditions(policy, x)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(policy, (x[:8],), dynamic_shapes={"obs": {0: batch}}, strict=strict)
    ops = {node.target for node in program.graph.nodes if node.op == "call_function"}
    assert ops and all(getattr(op, "namespace", None) == "aten" for op in ops), ops
    for module in (program.module(), program.run_decompositions().module()):
        assert_like_eager(module(x), eager_outputs(policy, x))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_runs_in_onnxruntime(gen, tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    policy = trained_policy(gen)
    x = test_inputs(gen)
    check_preconditions(policy, x)
    path = tmp_path / "policy.onnx"
    batch = {"obs": {0: torch.export.Dim("batch", min=2)}} if dynamo else None
    torch.onnx.export(policy, (x[:8],), path, dynamo=dynamo, input_names=["obs"], output_names=["obs_n", "actions"],
                      dynamic_shapes=batch, dynamic_axes=None if dynamo else {"obs": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(["obs_n", "actions"], {"obs": x.numpy()})  # another batch size than exported
    assert_like_eager(outputs, eager_outputs(policy, x))


TORCHSCRIPT_LOADER = """
import sys
sys.modules["fastnorm"] = None  # `import fastnorm` fails here, as where it is not installed
import torch
x = torch.load(sys.argv[1])
outputs = {path: torch.jit.load(path)(x) for path in sys.argv[3:]}
assert not [name for name in sys.modules if name.startswith("fastnorm.")]
torch.save(outputs, sys.argv[2])
"""


def test_torchscript_files_run_without_fastnorm(gen, tmp_path):
    policy = trained_policy(gen)
    x = test_inputs(gen)
    check_preconditions(policy, x)
    files = {"trace": tmp_path / "traced.pt", "script": tmp_path / "scripted.pt"}
    torch.jit.trace(policy, x[:8]).save(files["trace"])
    torch.jit.script(copy.deepcopy(policy)).save(files["script"])  # script replaces the RunningNorm: a copy
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", TORCHSCRIPT_LOADER, tmp_path / "x.pt", tmp_path / "out.pt",
                    *files.values()], check=True, cwd=tmp_path, timeout=120)
    outputs = torch.load(tmp_path / "out.pt")
    expected = eager_outputs(policy, x)
    for path in files.values():
        assert_like_eager(outputs[str(path)], expected)


def test_trace_and_torch_export_on_the_test_device(gen, device):
    if device.type == "cpu":
        pytest.skip("the tests above export on the CPU")
    policy = trained_policy(gen).to(device)  # trained on the CPU, normalizing with the device's kernel
    x = test_inputs(gen).to(device)
    check_preconditions(policy, x)
    expected = eager_outputs(policy, x)
    assert_like_eager(torch.jit.trace(policy, x)(x), expected)
    assert_like_eager(torch.export.export(policy, (x,)).module()(x), expected)


class ExportingSign(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1.0 if export.exporting() else x - 1.0


@pytest.mark.parametrize("how", ["compile", "trace", "export-strict", "export-non-strict"])
def test_exporting_is_true_exactly_under_trace_and_export(gen, how):
    """torch 2.11's dynamo answers torch.compiler.is_exporting() with True under torch.compile: an
    update inside a compiled step then raised as if exported."""
    x = randn((5,), gen)
    if how == "compile":
        y = torch.compile(ExportingSign(), fullgraph=True, backend="eager")(x)
    elif how == "trace":
        y = torch.jit.trace(ExportingSign(), x)(x)
    else:
        y = torch.export.export(ExportingSign(), (x,), strict=how == "export-strict").module()(x)
    torch.testing.assert_close(y, x - 1.0 if how == "compile" else x + 1.0, rtol=0, atol=0)
    assert not export.exporting()


class FoldedCastPairs(TorchDispatchMode):
    """Runs ops as a fuser that folds a float cast of a float cast into one cast: NNC's CUDA code
    generator (its HalfRewriter) turns double(float(m)) into double(m), and TorchScript runs traced
    and scripted models through NNC on a GPU."""

    def __init__(self):
        super().__init__()
        self.cast_from = {}  # id of a cast's result: (the result, kept alive; the tensor it was cast from)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args else None
        if func is not torch.ops.aten._to_copy.default or not src.is_floating_point() \
                or not kwargs.get("dtype", src.dtype).is_floating_point:
            return func(*args, **kwargs)
        origin = self.cast_from.get(id(src), (None, src))[1]
        out = func(origin, *args[1:], **kwargs)
        self.cast_from[id(out)] = (out, origin)
        return out


def test_normalize_survives_a_fuser_that_folds_cast_pairs(gen):
    """Where |mean| / divisor is 2e5, y needs mean_lo = mean - float(mean): computed through a
    float32 round trip, NNC folded it to 0 (the traced policy 2.7e-3 off the kernel on an H200)."""
    policy = trained_policy(gen)
    x = test_inputs(gen)
    check_preconditions(policy, x)
    norm = policy.norm
    mean, divisor = norm.mean.clone(), norm._divisor()
    with FoldedCastPairs():
        y = export.normalize(x, mean, divisor, CLIP)
    assert_like_eager([y], [norm(x)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_trace_keeps_the_dtype_and_the_eager_output(gen, dtype):
    norm = trained_policy(gen).norm
    x = test_inputs(gen).to(dtype)
    traced = torch.jit.trace(norm, x)
    assert_like_eager([traced(x)], [norm(x)], dtype)


def test_script_takes_runningnorm_arguments_and_refuses_updates(gen):
    norm = trained_policy(gen).norm
    x = test_inputs(gen)
    scripted = torch.jit.script(norm)
    out = torch.empty_like(x)
    assert scripted(x, torch.ones(x.shape[0], dtype=torch.bool), False, out) is out
    assert_like_eager([out], [norm(x)])
    with pytest.raises(torch.jit.Error, match="FrozenRunningNorm cannot update"):
        scripted(x, update=True)
    with pytest.raises(torch.jit.Error, match=r"x must be a floating-point tensor of shape \(\*batch, \*\[4, 8\]\)"):
        scripted(x[..., :5])


def test_script_in_place_leaves_a_module_that_refuses_training(gen):
    policy = trained_policy(gen)
    torch.jit.script(policy)  # PyTorch puts the scripted submodules into the tree it scripts
    assert isinstance(policy.norm, fastnorm.export.FrozenRunningNorm)
    with pytest.raises(RuntimeError, match="FrozenRunningNorm cannot update its statistics"):
        policy.train()(test_inputs(gen))


EXPORTS = {
    "trace": lambda model, x: torch.jit.trace(model, x),
    "torch.export": lambda model, x: torch.export.export(model, (x,)),
    "torch.export strict": lambda model, x: torch.export.export(model, (x,), strict=True),
    "onnx dynamo": lambda model, x: torch.onnx.export(model, (x,), dynamo=True),
    # The TorchScript-based exporter switches the model to eval mode unless told to keep training.
    "onnx torchscript": lambda model, x: torch.onnx.export(model, (x,), dynamo=False,
                                                           training=torch.onnx.TrainingMode.TRAINING),
}


@pytest.mark.parametrize("how", EXPORTS)
def test_exporting_an_update_is_an_error(gen, how):
    if how == "onnx dynamo":
        pytest.importorskip("onnxscript")
    policy = trained_policy(gen).train()
    before = policy.norm.state_dict()
    with pytest.raises(Exception, match="RunningNorm cannot update its statistics inside an exported model"):
        EXPORTS[how](policy, test_inputs(gen))
    for name, value in policy.norm.state_dict().items():
        assert not torch.is_tensor(value) or torch.equal(value, before[name]), name


def test_scripting_in_training_mode_is_an_error(gen):
    policy = trained_policy(gen).train()
    with pytest.raises(RuntimeError, match="torch.jit.script compiles RunningNorm's eval-mode transform only"):
        torch.jit.script(policy)
    assert isinstance(policy.norm, RunningNorm)


@pytest.mark.parametrize("how", ["trace", "torch.export"])
def test_normalize_advantages_refuses_export(gen, how):
    class WithAdvantages(nn.Module):
        def forward(self, adv):
            return fastnorm.normalize_advantages(adv)[0]

    with pytest.raises(Exception, match="normalize_advantages is not for deployment"):
        EXPORTS[how](WithAdvantages(), randn((64,), gen))


class NormalizeOnlyAdapter(RunningNorm):
    """An adapter whose host updates through update(), as rsl_rl's EmpiricalNormalization does."""

    forward_updates = False

    def forward(self, x):
        return self.normalize(x)


def test_adapter_that_only_normalizes_exports_in_training_mode(gen, tmp_path):
    policy = trained_policy(gen, NormalizeOnlyAdapter).train()
    x = test_inputs(gen)
    expected = eager_outputs(policy, x)
    assert_like_eager(torch.jit.trace(policy, x)(x), expected)
    assert_like_eager(torch.export.export(policy, (x,)).module()(x), expected)
    assert_like_eager(torch.jit.script(copy.deepcopy(policy))(x), expected)
