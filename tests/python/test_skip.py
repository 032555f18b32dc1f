"""Skip connections (pipegear.skip) through the pipeline: outputs, input
gradients and every parameter gradient equal the plain nn.Sequential of
the same layers, for every balance, chunks, checkpoint mode, schedule and
face; plus the verification at construction and the corner cases."""
import copy

import pytest
import torch
from torch import nn

import pipegear
from pipegear.skip import (Namespace, pop, skippable, stash,
                           verify_skippables)

WIDTH = 6


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def down(name):
    @skippable(stash=[name])
    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            yield stash(name, x)
            return torch.tanh(self.fc(x))

    return Down()


def up(name):
    @skippable(pop=[name])
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2 * WIDTH, WIDTH)

        def forward(self, x):
            skip = yield pop(name)
            return torch.tanh(self.fc(torch.cat([x, skip], dim=1)))

    return Up()


@skippable(stash=["res"])
class ResIn(nn.Module):
    def forward(self, x):
        yield stash("res", x)
        return x


@skippable(pop=["res"])
class ResOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        res = yield pop("res")
        return self.fc(x) + res * 0.5


def unet():
    """Three nested skips: d1 spans the whole model, d3 the middle."""
    return nn.Sequential(down("d1"), down("d2"), down("d3"), Dense(),
                         up("d3"), up("d2"), up("d1"), Dense())


def resnet():
    """Residuals of one name, isolated per block by namespaces; each
    residual spans three layers."""
    layers = []
    for _ in range(3):
        ns = Namespace()
        layers += [ResIn().isolate(ns), Dense(), Dense(), ResOut().isolate(ns)]
    return nn.Sequential(*layers)


def jumps():
    """With balance [2, 2, 2, 2]: 'a' stays in stage 0, 'b' crosses one
    boundary, 'c' three; 'e' is stashed by a layer that pops 'b'."""

    @skippable(stash=["a", "c"])
    class First(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            yield stash("c", x * 3)
            y = torch.tanh(self.fc(x))
            yield stash("a", y)
            return y

    @skippable(pop=["a"], stash=["b"])
    class Second(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            a = yield pop("a")
            y = torch.tanh(self.fc(x)) * a
            yield stash("b", y)
            return y

    @skippable(pop=["b"], stash=["e"])
    class Fourth(nn.Module):
        def forward(self, x):
            b = yield pop("b")
            yield stash("e", b * x)
            return x + b

    @skippable(pop=["c", "e"])
    class Last(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)

        def forward(self, x):
            c = yield pop("c")
            e = yield pop("e")
            return self.fc(x) + c * e

    return nn.Sequential(First(), Second(), Dense(), Fourth(), Dense(),
                         Dense(), Dense(), Last())


MODELS = {"unet": unet, "resnet": resnet, "jumps": jumps}


def even_balance(n, k):
    base, extra = divmod(n, k)
    return [base + (i < extra) for i in range(k)]


FACES = [("module", "gpipe"), ("step", "gpipe"), ("step", "1f1b"),
         ("step", "zb-h1"), ("step", "zb-h2")]


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


def run_plain(model, x, target, face):
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    if face == "module":
        (y * target).sum().backward()
    else:
        nn.MSELoss()(y, target).backward()
    return y.detach(), x.grad, grads_of(model)


def run_pipe(pipe, x, target, face):
    x = x.detach().clone().requires_grad_(True)
    if face == "module":
        y = pipe(x)
        (y * target).sum().backward()
        y = y.detach()
    else:
        pipe.step(x, target, nn.MSELoss())
        y = None
    return y, x.grad, grads_of(pipe)


def check_transparent(make, balance, chunks, checkpoint, face, schedule,
                      batch=7, virtual_stages=1):
    torch.manual_seed(0)
    plain = make()
    pipe_model = copy.deepcopy(plain)
    x = torch.randn(batch, WIDTH)
    target = torch.randn(batch, WIDTH)
    pipe = pipegear.GPipe(pipe_model, balance, chunks=chunks,
                          checkpoint=checkpoint, schedule=schedule,
                          virtual_stages=virtual_stages)
    y_ref, gx_ref, gp_ref = run_plain(plain, x, target, face)
    y, gx, gp = run_pipe(pipe, x, target, face)
    if y is not None:
        torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
    assert len(gp) == len(gp_ref)
    for a, b in zip(gp, gp_ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("face,schedule", FACES, ids=lambda v: str(v))
@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("chunks", [1, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transparency(name, k, chunks, checkpoint, face, schedule):
    make = MODELS[name]
    n = len(make())
    check_transparent(make, even_balance(n, k), chunks, checkpoint, face,
                      schedule)


@pytest.mark.parametrize("balance", [[1, 7], [7, 1], [1, 1, 5, 1],
                                     [3, 1, 1, 3], [1, 1, 1, 1, 1, 1, 1, 1]])
@pytest.mark.parametrize("face,schedule", FACES, ids=lambda v: str(v))
def test_transparency_uneven_balance(balance, face, schedule):
    check_transparent(unet, balance, 3, "except_last", face, schedule)
    check_transparent(jumps, balance, 4, "always", face, schedule)


@pytest.mark.parametrize("schedule", ["interleaved", "interleaved-zb"])
@pytest.mark.parametrize("checkpoint", ["never", "always", "except_last"])
@pytest.mark.parametrize("chunks", [1, 3, 4, 8])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_transparency_interleaved(name, chunks, checkpoint, schedule):
    """Interleaved 1F1B and its zero-bubble variant: 4 partitions on 2
    workers (virtual_stages=2), the skips between partitions of one worker
    and of two."""
    make = MODELS[name]
    check_transparent(make, even_balance(len(make()), 4), chunks, checkpoint,
                      "step", schedule, virtual_stages=2)


def test_boundaries_crossed():
    """The jumps model's skips cross 0, 1 and 3 boundaries at [2,2,2,2]."""
    from pipegear.skip import skip_layout

    model = jumps()
    layout = skip_layout(list(model._modules.items()), [2, 2, 2, 2])
    names = [([k[1] for _, k in pops], [k[1] for _, k in stashes])
             for pops, stashes in layout]
    assert names == [([], ["c", "b"]), (["b"], ["e"]), ([], []),
                     (["c", "e"], [])]


def test_no_grad_and_eval():
    torch.manual_seed(0)
    plain = unet()
    pipe = pipegear.GPipe(copy.deepcopy(plain), [2, 3, 3], chunks=3)
    x = torch.randn(5, WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), plain(x))
    pipe.eval()
    torch.testing.assert_close(pipe(x).detach(), plain(x).detach())


def test_none_and_integer_skips():
    @skippable(stash=["none", "idx"])
    class Stash(nn.Module):
        def forward(self, x):
            yield stash("none", None)
            yield stash("idx", (x > 0).long())
            return x * 2

    @skippable(pop=["none", "idx"])
    class Pop(nn.Module):
        def forward(self, x):
            none = yield pop("none")
            idx = yield pop("idx")
            assert none is None
            assert idx.dtype == torch.int64
            return x + idx.to(x.dtype)

    model = nn.Sequential(Stash(), nn.Linear(3, 3), Pop())
    x = torch.randn(6, 3, requires_grad=True)
    y_ref = model(x)
    y_ref.sum().backward()
    g_ref = x.grad
    x.grad = None
    for checkpoint in ["never", "always"]:
        pipe = pipegear.GPipe(model, [1, 1, 1], chunks=4,
                              checkpoint=checkpoint)
        y = pipe(x)
        torch.testing.assert_close(y, y_ref)
        y.sum().backward()
        torch.testing.assert_close(x.grad, g_ref)
        x.grad = None


def test_skip_of_input_without_grad():
    """A skip that needs no gradient (the input's, nothing requires grad)
    and a parameter-free chain still run in every mode."""
    model = nn.Sequential(ResIn(), nn.ReLU(), nn.ReLU(), ResOut())
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(4, WIDTH)
    for checkpoint in ["never", "always", "except_last"]:
        pipe = pipegear.GPipe(model, [1, 2, 1], chunks=2,
                              checkpoint=checkpoint)
        torch.testing.assert_close(pipe(x), model(x))


def test_random_layers_replay():
    """Dropout in skippable layers: every checkpoint mode and balance give
    the same output and gradients for the same seed."""

    @skippable(stash=["s"])
    class DropStash(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            yield stash("s", self.drop(x))
            return x

    @skippable(pop=["s"])
    class DropPop(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(WIDTH, WIDTH)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            s = yield pop("s")
            return self.drop(self.fc(x)) + s

    torch.manual_seed(0)
    model = nn.Sequential(DropStash(), Dense(), DropPop())
    x = torch.randn(6, WIDTH)
    results = []
    for balance, checkpoint in [([3], "never"), ([1, 1, 1], "always"),
                                ([2, 1], "except_last")]:
        pipe = pipegear.GPipe(copy.deepcopy(model), balance, chunks=3,
                              checkpoint=checkpoint)
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = pipe(xi)
        y.sum().backward()
        results.append((y.detach(), xi.grad, grads_of(pipe)))
    for y, gx, gp in results[1:]:
        torch.testing.assert_close(y, results[0][0])
        torch.testing.assert_close(gx, results[0][1])
        for a, b in zip(gp, results[0][2]):
            torch.testing.assert_close(a, b)


def test_deferred_batch_norm():
    """Skips around DeferredBatchNorm: the running statistics after a
    step equal those of the plain model on the whole batch."""

    @skippable(stash=["s"])
    class Stash(nn.Module):
        def forward(self, x):
            yield stash("s", x)
            return x

    @skippable(pop=["s"])
    class Pop(nn.Module):
        def forward(self, x):
            s = yield pop("s")
            return x + s

    torch.manual_seed(0)
    model = nn.Sequential(Stash(), nn.Linear(WIDTH, WIDTH),
                          nn.BatchNorm1d(WIDTH), nn.Linear(WIDTH, WIDTH), Pop())
    plain = copy.deepcopy(model)
    x = torch.randn(8, WIDTH)
    pipe = pipegear.GPipe(model, [2, 2, 1], chunks=4,
                          deferred_batch_norm=True, checkpoint="always")
    pipe(x).sum().backward()
    plain(x)
    bn = [m for m in pipe.modules()
          if isinstance(m, pipegear.DeferredBatchNorm)][0]
    torch.testing.assert_close(bn.running_mean, plain[2].running_mean)
    torch.testing.assert_close(bn.running_var, plain[2].running_var)


def test_skips_inside_one_partition_stay_local():
    from pipegear.skip import skip_layout

    model = unet()
    layout = skip_layout(list(model._modules.items()), [8])
    assert layout == [([], [])]
    layout = skip_layout(list(model._modules.items()), [3, 5])
    assert [len(p) for p, _ in layout] == [0, 3]
    assert [len(s) for _, s in layout] == [3, 0]


def test_verification_errors():
    with pytest.raises(TypeError, match="'1' declared 'x' as poppable but it "
                       "was not stashed"):
        pipegear.GPipe(nn.Sequential(Dense(), up("x")), [1, 1])
    with pytest.raises(TypeError, match="no module declared 'x' as poppable "
                       "but stashed"):
        pipegear.GPipe(nn.Sequential(down("x"), Dense()), [1, 1])
    # A skip going backwards: the pop comes before the stash.
    with pytest.raises(TypeError, match="'0' declared 'x' as poppable"):
        pipegear.GPipe(nn.Sequential(up("x"), down("x")), [1, 1])
    with pytest.raises(TypeError, match="'1' redeclared 'x' as stashable"):
        pipegear.GPipe(nn.Sequential(down("x"), down("x"), up("x")), [1, 1, 1])
    with pytest.raises(TypeError, match="'2' redeclared 'x' as poppable"):
        pipegear.GPipe(nn.Sequential(down("x"), up("x"), up("x")), [1, 1, 1])
    # Namespaces isolate the same name.
    ns1, ns2 = Namespace(), Namespace()
    verify_skippables(nn.Sequential(down("x").isolate(ns1), up("x").isolate(ns1),
                                    down("x").isolate(ns2), up("x").isolate(ns2)))


def test_undeclared_and_unused_skips_raise():
    @skippable(stash=["x"])
    class Forgets(nn.Module):
        def forward(self, x):
            return x

    @skippable(pop=["x"])
    class Pops(nn.Module):
        def forward(self, x):
            s = yield pop("x")
            return x + s

    pipe = pipegear.GPipe(nn.Sequential(Forgets(), Pops()), [1, 1])
    # A ValueError (a user mistake) that is also torchgpipe's RuntimeError.
    with pytest.raises(ValueError, match="did not stash") as e:
        pipe(torch.randn(2, 3))
    assert isinstance(e.value, RuntimeError)

    @skippable()
    class Undeclared(nn.Module):
        def forward(self, x):
            yield stash("y", x)
            return x

    with pytest.raises(ValueError, match="did not declare"):
        Undeclared()(torch.randn(2))
    with pytest.raises(ValueError, match="found no tensor stashed"):
        Pops()(torch.randn(2))


def test_skippable_outside_pipeline_and_repr():
    model = unet()
    x = torch.randn(3, WIDTH)
    torch.testing.assert_close(model(x), model(x))
    assert repr(model[0]).startswith("@skippable(Down(")



def test_profiler_counts_skips_on_their_two_layers():
    """balance_by_time profiles skippable layers (a popped skip is a leaf
    of its own, so each backward stops at its layer); the skip's bytes are
    counted on the stashing and the popping layer, not on those between."""
    from pipegear.balance import balance_by_size, balance_by_time, profile_layers

    model = unet()
    x = torch.randn(4, WIDTH)
    profiles = profile_layers(model, x, repeats=1)
    row = 4 * WIDTH * 4  # one skip: 4 rows of WIDTH float32
    assert [p.skip_bytes for p in profiles] == [row, row, row, 0, row, row,
                                                row, 0]
    assert len(balance_by_time(2, model, x, repeats=1)) == 2
    assert sum(balance_by_size(3, model, x)) == len(model)
    # The model is left as it was: no gradients, no tensor left stashed.
    assert all(p.grad is None for p in model.parameters())
    from pipegear.skip import current_skip_tracker
    assert not current_skip_tracker().tensors


def test_deepcopy_of_a_pipeline_with_skips():
    torch.manual_seed(0)
    pipe = pipegear.GPipe(unet(), [3, 5], chunks=2)
    twin = copy.deepcopy(pipe)
    x = torch.randn(4, WIDTH)
    torch.testing.assert_close(twin(x), pipe(x))



# ---- In-place operations on memory a skip shares (design decision 16) ----
# Without a pipeline a skip and the stashing layer's output can be one
# tensor: an in-place change of either reaches both. Across stages the skip
# travels on its own, so a stage that would make such a change raises
# ValueError naming the skip; anything else equals the plain model.

@skippable(stash=["s"])
class StashOut(nn.Module):
    """torchgpipe's Identity: the skip is the layer's output."""

    def forward(self, x):
        yield stash("s", x)
        return x


@skippable(stash=["s"])
class StashIn(nn.Module):
    """The skip is the layer's input; the output is a new tensor."""

    def forward(self, x):
        yield stash("s", x)
        return torch.tanh(x)


@skippable(pop=["s"])
class PopAdd(nn.Module):
    def forward(self, x):
        k = yield pop("s")
        return x + k


@skippable(pop=["s"])
class PopAddInPlace(nn.Module):
    def forward(self, x):
        k = yield pop("s")
        return k.add_(x)


def linear():
    return nn.Linear(WIDTH, WIDTH)


def relu_after_stash():
    """The skip is the stash layer's output; ReLU(inplace) modifies it."""
    return nn.Sequential(linear(), StashOut(), nn.ReLU(inplace=True),
                         linear(), PopAdd(), linear())


def add_into_pop():
    """The popping layer adds into the popped tensor, which is also the
    stash layer's output."""
    return nn.Sequential(linear(), StashOut(), Dense(), PopAddInPlace(),
                         linear())


def add_into_pop_of_input():
    """The popping layer adds into the popped tensor, which is the stash
    layer's input: it shares memory with nothing that left the stage."""
    return nn.Sequential(linear(), StashIn(), linear(), PopAddInPlace(),
                         linear())


def identity_then_inplace_elsewhere():
    """torchgpipe's residual: stash x and return x, in-place ReLUs only on
    new tensors."""
    return nn.Sequential(linear(), StashOut(), linear(),
                         nn.ReLU(inplace=True), PopAdd(),
                         nn.ReLU(inplace=True), linear())


CHECKPOINTS = ["never", "always", "except_last"]


@pytest.mark.parametrize("face,schedule", FACES, ids=lambda v: str(v))
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("make,balance,what", [
    (relu_after_stash, [2, 4], "its input"),
    (relu_after_stash, [2, 2, 2], "its input"),
    (add_into_pop, [2, 1, 2], "the popped tensor of skip 's'"),
    (add_into_pop, [2, 3], "skip 's'"),
], ids=["relu-next-stage", "relu-middle-stage", "pop-later", "pop-next"])
def test_inplace_on_memory_a_skip_shares_raises(make, balance, what, chunks,
                                                checkpoint, face, schedule):
    torch.manual_seed(0)
    model = make()
    before = copy.deepcopy(model.state_dict())
    pipe = pipegear.GPipe(model, balance, chunks=chunks,
                          checkpoint=checkpoint, schedule=schedule)
    x, target = torch.randn(7, WIDTH), torch.randn(7, WIDTH)
    with pytest.raises(ValueError) as info:
        run_pipe(pipe, x, target, face)
    text = str(info.value)
    assert "modified in place" in text and what in text, text
    assert "skip 's' (stashed by stage 0, popped by stage" in text, text
    assert "x.clone()" in text, text
    for name, value in pipe.state_dict().items():
        torch.testing.assert_close(value, before[name])


@pytest.mark.parametrize("face,schedule", FACES, ids=lambda v: str(v))
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("chunks", [1, 4])
@pytest.mark.parametrize("make,balance", [
    # The in-place change inside the stashing stage: every later stage
    # sees the changed tensor, as without a pipeline.
    (relu_after_stash, [3, 3]),
    (relu_after_stash, [4, 2]),
    (relu_after_stash, [3, 1, 2]),
    # A popped tensor that shares memory only with the stash layer's input.
    (add_into_pop_of_input, [1, 2, 2]),
    (add_into_pop_of_input, [1, 1, 1, 2]),
    (identity_then_inplace_elsewhere, [2, 5]),
    (identity_then_inplace_elsewhere, [3, 4]),
    (identity_then_inplace_elsewhere, [2, 2, 1, 2]),
])
def test_inplace_away_from_shared_memory_matches(make, balance, chunks,
                                                 checkpoint, face, schedule):
    check_transparent(make, balance, chunks, checkpoint, face, schedule)


def test_inplace_add_into_unshared_pop_repeatedly_exact():
    """The popping stage's recomputation works on a copy of its leaves: its
    in-place add must not reach the stash layer's input while that stage
    recomputes (it raced before)."""
    for _ in range(5):
        for checkpoint in ["always", "except_last"]:
            check_transparent(add_into_pop_of_input, [1, 2, 2], 4,
                              checkpoint, "module", "gpipe")


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
@pytest.mark.parametrize("chunks", [1, 4])
def test_inplace_and_skips_interleaved(chunks, checkpoint):
    """Interleaved 1F1B, 4 partitions on 2 workers: the same refusals and
    the same matches."""
    for make, balance in [(relu_after_stash, [2, 1, 1, 2]),
                          (add_into_pop, [2, 1, 1, 1])]:
        pipe = pipegear.GPipe(make(), balance, chunks=chunks,
                              checkpoint=checkpoint, schedule="interleaved",
                              virtual_stages=2)
        with pytest.raises(ValueError, match="skip 's' \\(stashed by stage 0"):
            run_pipe(pipe, torch.randn(7, WIDTH), torch.randn(7, WIDTH),
                     "step")
    for make, balance in [(relu_after_stash, [3, 1, 1, 1]),
                          (add_into_pop_of_input, [1, 2, 1, 1]),
                          (identity_then_inplace_elsewhere, [2, 2, 1, 2])]:
        check_transparent(make, balance, chunks, checkpoint, "step",
                          "interleaved", virtual_stages=2)
