"""The meta-router (docs/brainstacks.md §6): network, features, outcome-based targets, group split, inference rule."""

from dataclasses import replace

import pytest
import torch

from ministacks.lm.model import ModelConfig, Transformer
from ministacks.routing.oracle import BASE, ComboLosses, all_combinations, exhaustive_best, find_targets, greedy_best
from ministacks.routing.router import (MetaRouter, RouterConfig, RouterData, prompt_features, router_loss, router_metrics,
                               routing_weights, train_router)
from ministacks.stages.route import group_split
from ministacks.stacks.layer import StacksOn, add_stack, freeze_active, inject_stacks, make_adapter, set_stacks, stacked_layers
from ministacks.lm.tokenizer import Tokenizer
from ministacks.training.examples import ExampleSet, example_losses

DOMAINS = ("chat", "code", "math", "medical", "reasoning")


# -- the network ---------------------------------------------------------------------------------------


def test_parameter_count_at_gemma_width():
    """docs/brainstacks.md §6: 2,761,730 parameters at token_dim 3840 (Gemma 3 12B) and 5 domains, counted layer by
    layer from the paper's description (not from the implementation's modules)."""
    token_dim, H, D = 3840, 512, 5
    linear = lambda i, o: i * o + o  # noqa: E731  weight + bias
    layer_norm = 2 * H  # weight + bias
    paper = (linear(token_dim, H) + layer_norm  # token projection + its LayerNorm
             + H + D * H  # the global query and one query per domain
             + layer_norm + layer_norm  # the global context's LayerNorm, the domain contexts' LayerNorm
             + linear(2 * H, H) + layer_norm + linear(H, H)  # the shared fusion MLP
             + linear(H, 1)  # the shared head
             + 1)  # log T
    assert paper == 2_761_730
    n = sum(p.numel() for p in MetaRouter(token_dim, DOMAINS).parameters())
    assert n == paper
    # a new domain costs one query vector: the fusion MLP and head are shared
    assert sum(p.numel() for p in MetaRouter(token_dim, DOMAINS + ("law",)).parameters()) - n == H


def test_forward_is_the_paper_network_written_out():
    """Parity with the description in docs/brainstacks.md §6: plain dot-product scores (no 1/√H), the global and the
    per-domain contexts each through its own LayerNorm, the shared fusion MLP and head, logits / T."""
    torch.manual_seed(0)
    r = MetaRouter(12, DOMAINS[:3], RouterConfig(hidden=16)).eval()
    with torch.no_grad():  # make every part visible: nonzero queries, distinct LayerNorms, T != 1
        r.global_query.normal_()
        r.domain_queries.normal_()
        for norm in (r.global_norm, r.domain_norm):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
        r.log_temp.fill_(0.3)
    feats, mask = torch.randn(2, 5, 12), torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    ln = torch.nn.functional.layer_norm
    expect = torch.zeros(2, 3)
    for b in range(2):
        h = r.proj_norm(r.proj(feats[b, mask[b]]))  # [T, H]

        def pool(q):
            return torch.softmax(h @ q, 0) @ h  # plain dot products

        g = ln(pool(r.global_query), (16,), r.global_norm.weight, r.global_norm.bias)
        for d in range(3):
            c = ln(pool(r.domain_queries[d]), (16,), r.domain_norm.weight, r.domain_norm.bias)
            expect[b, d] = r.head(r.fusion(torch.cat([c, g]))).squeeze() / r.log_temp.exp()
    assert torch.allclose(r(feats, mask), expect, atol=1e-5)
    # the transformer-style scaled scores are an option, and not the default
    scaled = MetaRouter(12, DOMAINS[:3], RouterConfig(hidden=16, scaled_scores=True)).eval()
    scaled.load_state_dict(r.state_dict())
    assert not torch.allclose(scaled(feats, mask), expect, atol=1e-3)


def test_queries_start_small():
    """Queries ~ N(0, 0.02²): every score starts near 0, so the first pooling is close to a plain mean."""
    torch.manual_seed(0)
    r = MetaRouter(64, DOMAINS)
    q = torch.cat([r.global_query[None], r.domain_queries]).detach()
    assert abs(float(q.std()) - 0.02) < 0.002
    assert abs(float(q.mean())) < 0.002


def test_shapes_and_padding_mask():
    torch.manual_seed(0)
    r = MetaRouter(32, DOMAINS).eval()
    feats = torch.randn(3, 7, 32)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    logits = r(feats, mask)
    assert logits.shape == (3, 5)
    # what lies under the mask does not matter
    noisy = feats.clone()
    noisy[1, 4:] = 1e3
    assert torch.allclose(r(noisy, mask), logits, atol=1e-6)
    # and equals running the prompt alone, unpadded
    assert torch.allclose(r(feats[1:2, :4], mask[1:2, :4]), logits[1:2], atol=1e-5)


def test_sigmoid_outputs_are_independent_per_domain():
    """Not a softmax: a domain's probability depends on its own query only, and they need not sum to 1."""
    torch.manual_seed(0)
    r = MetaRouter(16, DOMAINS).eval()
    feats, mask = torch.randn(4, 6, 16), torch.ones(4, 6, dtype=torch.bool)
    before = r.probabilities(feats, mask)
    with torch.no_grad():
        r.domain_queries[2] += torch.randn(r.cfg.hidden)  # change math's query only
    after = r.probabilities(feats, mask)
    changed = (after - before).abs().amax(0) > 1e-6
    assert changed.tolist() == [False, False, True, False, False]
    assert not torch.allclose(before.sum(-1), torch.ones(4))


def test_temperature_is_clamped():
    r = MetaRouter(8, DOMAINS)
    with torch.no_grad():
        r.log_temp.fill_(10.0)
    assert float(r.temperature().detach()) == pytest.approx(3.0)
    with torch.no_grad():
        r.log_temp.fill_(-10.0)
    assert float(r.temperature().detach()) == pytest.approx(0.3)


def test_margin_term_pushes_out_of_the_undecided_band():
    cfg = RouterConfig()
    t = torch.tensor([[1.0]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    # p = 0.5 is undecided: the margin adds 0.05 * 0.3; p = 0.9 is decided: the margin adds nothing
    assert float(router_loss(torch.tensor([[0.0]]), t, cfg) - bce(torch.tensor([[0.0]]), t)) == pytest.approx(0.015)
    z = torch.logit(torch.tensor([[0.9]]))
    assert float(router_loss(z, t, cfg)) == pytest.approx(float(bce(z, t)))


def test_training_learns_a_separable_task_and_keeps_the_best_epoch():
    """A keyword token names the domain: after training, top-1 is high; the kept epoch is the best score.

    The keyword sits at a random position among noise tokens. (Every domain shares the fusion MLP and
    the head, so domains differ only in where their query attends: a prompt whose tokens were all alike
    would get the same probability for every domain.)"""
    torch.manual_seed(0)
    D, n = 3, 150
    label = torch.arange(n) % D
    feats = torch.randn(n, 5, 12) * 0.3
    feats[torch.arange(n), torch.randint(0, 5, (n,)), label] += 3.0
    targets = torch.nn.functional.one_hot(label, D).float()
    data = RouterData(feats, torch.ones(n, 5, dtype=torch.bool), targets, label, targets)
    cfg = RouterConfig(hidden=32, epochs=15, lr=3e-3)
    r = MetaRouter(12, DOMAINS[:D], cfg)
    fit = train_router(r, data.subset(torch.arange(0, 120)), data.subset(torch.arange(120, 150)), cfg, progress=False)
    scores = [h["score"] for h in fit["history"]]
    assert fit["best"]["score"] == max(scores) and fit["best_epoch"] == scores.index(max(scores)) + 1
    assert fit["best"]["single_top1"] > 0.8  # chance: 1/3


class FixedLogits(torch.nn.Module):
    """A stand-in router whose logits are given: row i of `logits` for prompt i."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, features, mask):
        return self.logits


def _metric_data(targets, label, label_set):
    n = len(targets)
    return RouterData(torch.zeros(n, 1, 4), torch.ones(n, 1, dtype=torch.bool), torch.tensor(targets),
                      torch.tensor(label), torch.tensor(label_set))


def test_metrics_compare_with_the_targets_and_report_label_agreement_apart():
    """A router that learned the oracle's "medical prompts -> chat+math" perfectly scores 1 on the
    target metrics (what it is trained and selected on) and 0 on agreement with the medical label."""
    c, k, m, med, r = range(5)
    # two medical prompts whose oracle targets are chat+math (0.8 each, label 0.2 on medical)
    targets = [[0.8, 0, 0.8, 0.2, 0], [0.8, 0, 0.8, 0.2, 0],
               [0, 1, 1, 0, 0]]  # a mixed prompt: code+math (its multi-hot label)
    label = [med, med, -1]
    label_set = [[0, 0, 0, 1, 0], [0, 0, 0, 1, 0], [0, 1, 1, 0, 0]]
    logits = torch.logit(torch.tensor([[0.9, 0.1, 0.8, 0.1, 0.1],  # picks chat: one of the tied top targets
                                       [0.7, 0.1, 0.95, 0.1, 0.1],  # picks math: the other one
                                       [0.1, 0.45, 0.4, 0.1, 0.1]]))  # top-2 = {code, math}, neither > 0.5
    out = router_metrics(FixedLogits(logits), _metric_data(targets, label, label_set))
    assert out["single_top1"] == 1.0 and out["label_top1"] == 0.0
    assert out["mixed_set_match"] == 1.0  # the |S| = 2 most probable domains are S
    assert out["label_set_match"] == 0.0  # {p > 0.5} = {} is not the label set
    bce = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(targets)))
    assert out["score"] == pytest.approx(0.5 * 1.0 + 0.35 * 1.0 - 0.15 * bce)


def test_metrics_count_misses():
    c, k, m, med, r = range(5)
    targets = [[0.16, 0, 0.8, 0.2, 0], [0, 1, 1, 0, 0], [1, 0, 0, 1, 0]]
    label, label_set = [med, -1, -1], [[0, 0, 0, 1, 0], [0, 1, 1, 0, 0], [1, 0, 0, 1, 0]]
    logits = torch.logit(torch.tensor([[0.2, 0.1, 0.3, 0.9, 0.1],  # medical first: target's top is math
                                       [0.1, 0.9, 0.2, 0.1, 0.8],  # top-2 = {code, reasoning}, S = {code, math}
                                       [0.9, 0.1, 0.1, 0.8, 0.1]]))  # top-2 = {chat, medical} = S
    out = router_metrics(FixedLogits(logits), _metric_data(targets, label, label_set))
    assert out["single_top1"] == 0.0 and out["label_top1"] == 1.0
    assert out["mixed_set_match"] == pytest.approx(0.5)


# -- the inference rule -----------------------------------------------------------------------------


def test_inference_rule_floor_threshold_and_weights():
    w = routing_weights({"chat": 0.05, "code": 0.9, "math": 0.12, "medical": 0.1201, "reasoning": 0.0})
    assert w == {"chat": 0.2, "code": 0.9, "medical": pytest.approx(0.1201)}  # 0.12 itself is off
    assert routing_weights({"chat": 0.7, "math": 0.3}) == {"chat": 0.7, "math": 0.3}  # above the floor: p itself
    assert routing_weights({"code": 0.05}) == {}  # no chat in the run: no floor


# -- outcome-based targets ----------------------------------------------------------------------------


class TableLosses(ComboLosses):
    """Losses from a hand-made table (combination -> [N]), counting which combinations were asked for."""

    def __init__(self, table):
        self.table, self.asked = {}, []
        self._given = table

    def __call__(self, combo):
        self.asked.append(combo)
        self.table[combo] = self._given(combo)
        return self.table[combo]


def _planted(best_by_example, domains):
    """Every combination's loss is 2 + 0.1·(its distance from the planted best), base 2.5."""
    def losses(combo):
        out = []
        for best in best_by_example:
            if combo == BASE:
                out.append(2.5)
            else:
                out.append(1.0 if combo == best else 2.0 + 0.1 * len(set(combo) ^ set(best or ())))
        return torch.tensor(out)
    return losses


def test_exhaustive_search_finds_the_planted_best_combination():
    domains = DOMAINS
    planted = [("chat", "math"), ("code", "medical", "reasoning"), ("medical",), None]
    table = _planted(planted, domains)
    # the last example: nothing beats the base
    def losses(combo):
        v = table(combo)
        v[3] = 0.5 if combo == BASE else 3.0
        return v
    best = exhaustive_best(TableLosses(losses), domains, min_gain=0.01)
    assert best == [("chat", "math"), ("code", "medical", "reasoning"), ("medical",), BASE]
    assert len(all_combinations(domains)) == 31


def test_greedy_search_can_miss_what_exhaustive_finds():
    """The released code's greedy search stops where no single addition helps; exhaustive does not."""
    domains = ("chat", "code", "math")

    def losses(combo):  # code+math together are best, but each alone is worse than chat alone
        return torch.tensor([{BASE: 3.0, ("chat",): 2.0, ("code",): 2.5, ("math",): 2.5, ("chat", "code"): 2.1,
                              ("chat", "math"): 2.1, ("code", "math"): 1.0, ("chat", "code", "math"): 2.2}[combo]])
    assert exhaustive_best(TableLosses(losses), domains, min_gain=0.01) == [("code", "math")]
    assert greedy_best(TableLosses(losses), domains, min_gain=0.01) == [("chat",)]


def test_greedy_search_continues_its_pass_after_an_acceptance():
    """The released code's pass goes on to the *next* domain on top of the combination just accepted; it
    does not restart from the first domain. Planted so that the two readings disagree:

        start: code (best single, beats the base)
        pass 1, continue: chat no; math yes (code+math); medical yes (code+math+medical); pass 2: chat no -> stop
        pass 1, restart:  chat no; math yes; restart: chat+code+math yes; medical no -> stop
    """
    domains = ("chat", "code", "math", "medical")
    table = {BASE: 3.0, ("chat",): 2.9, ("code",): 2.0, ("math",): 2.8, ("medical",): 2.8,
             ("chat", "code"): 2.0, ("code", "math"): 1.5, ("code", "math", "medical"): 1.0,
             ("chat", "code", "math"): 1.2, ("chat", "code", "math", "medical"): 1.15}
    losses = TableLosses(lambda combo: torch.tensor([table.get(combo, 2.95)]))
    assert greedy_best(losses, domains, min_gain=0.01) == [("code", "math", "medical")]
    # the acceptance rule is "lower by more than min_gain": 0.005 better is not enough
    table2 = {**table, ("code", "math"): 1.996}
    assert greedy_best(TableLosses(lambda combo: torch.tensor([table2.get(combo, 2.95)])), domains, 0.01) == [("code",)]
    # the start: the best single domain only if it beats the base at all
    assert greedy_best(TableLosses(lambda combo: torch.tensor([1.0 if combo == BASE else 2.0])), domains, 0.01) == [BASE]


def test_oracle_combinations_run_chat_at_its_inference_floor(floored):
    """docs/brainstacks.md §6: every configuration the oracle evaluates has chat at max(w_chat, 0.2), as inference has."""
    from ministacks.routing.oracle import combo_weights

    model, data = floored
    assert combo_weights(("math",), 0.2) == {"math": 1.0, "chat": 0.2}
    assert combo_weights(("chat", "math"), 0.2) == {"chat": 1.0, "math": 1.0}
    assert combo_weights(BASE, 0.2) == {} and combo_weights(("math",), None) == {"math": 1.0}
    floored_losses, plain = ComboLosses(model, data, chat_floor=0.2), ComboLosses(model, data)
    set_stacks(model, StacksOn.weighted({"code": 1.0, "chat": 0.2}))
    expect = example_losses(model, data)
    set_stacks(model, StacksOn.ungated())
    assert torch.allclose(floored_losses(("code",)), expect)
    assert not torch.allclose(plain(("code",)), expect, atol=1e-4)  # the flag that drops the floor
    assert torch.allclose(floored_losses(BASE), plain(BASE))  # the base runs no stack at all


def test_route_uses_the_floor_unless_told_not_to():
    from ministacks.routing.oracle import oracle_floor

    assert oracle_floor(RouterConfig(), DOMAINS) == 0.2
    assert oracle_floor(RouterConfig(oracle_chat_floor=False), DOMAINS) is None
    assert oracle_floor(RouterConfig(), ("code", "math")) is None  # no chat stacks to floor


def test_targets_chat_floor_reasoning_soft_and_label_mix():
    domains = DOMAINS
    planted = [("math",), ("code",)]
    table = _planted(planted, domains)

    def losses(combo):
        v = table(combo)
        if combo == ("math", "reasoning"):
            v[0] = 0.995  # adding reasoning to math helps, by less than min_gain: not chosen, soft target
        return v
    res = find_targets(TableLosses(losses), ["medical", "code"], domains)
    c, k, m, med, r = range(5)
    t = res.targets
    # example 0: best = math; label medical; chat floored; reasoning soft
    assert t[0, m] == pytest.approx(0.8) and t[0, med] == pytest.approx(0.2)
    assert t[0, c] == pytest.approx(0.8 * 0.2) and t[0, r] == pytest.approx(0.8 * 0.5)
    # example 1: best = code = label: 0.8 + 0.2 = 1
    assert t[1, k] == pytest.approx(1.0) and t[1, r] == 0.0 and t[1, m] == 0.0
    assert res.best == [("math",), ("code",)]


# -- on a real model ------------------------------------------------------------------------------------


def _with_stacks(base, domains):
    """A copy of `base` holding one frozen stack per domain, each with random (nonzero) B."""
    model = Transformer(base.cfg)
    model.load_state_dict(base.state_dict())
    inject_stacks(model)
    for d in domains:
        add_stack(model, make_adapter("moe"))
        for layer in stacked_layers(model):
            torch.nn.init.normal_(layer.active.lora_B, std=0.2)
        freeze_active(model, d)
    return model.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny base with one nonzero stack for each of two domains, and a small BPE tokenizer."""
    torch.manual_seed(0)
    tok = Tokenizer.train(["the patient takes 5 mg of the drug every day", "def add(a, b): return a + b"] * 20,
                          vocab_size=300)
    base = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                                   max_seq_len=256))
    return _with_stacks(base, ("code", "medical")), base.eval(), tok


@pytest.fixture(scope="module")
def floored(tiny):
    """A tiny model with a chat and a code stack (both nonzero) and a few examples to score."""
    from ministacks.data import Example

    _, base, tok = tiny
    torch.manual_seed(1)
    model = _with_stacks(base, ("chat", "code"))
    exs = [Example("code", "Add", "", "a + b", None, "t"), Example("chat", "Hi", "", "the patient", None, "t")]
    return model, ExampleSet(tok, exs, completion_only=True, max_len=256)


def test_feature_pass_leaves_frozen_stacks_in_eval_mode(tiny):
    """The feature pass restores the model's training mode, and frozen stacks never come back in training
    mode (noisy routing) after it: StackedLinear.train keeps them in eval mode."""
    model, _, tok = tiny
    model.train(True)
    try:
        prompt_features(model, tok, ["the patient takes 5 mg"])
        assert model.training
        frozen = [a for layer in stacked_layers(model) for stack in layer.stacks.values() for a in stack]
        assert frozen and not any(a.training for a in frozen)
    finally:
        model.train(False)


def test_features_come_from_the_base_with_stacks_off(tiny):
    model, base, tok = tiny
    texts = ["the patient takes 5 mg", "def add(a, b)"]
    cfg = RouterConfig()
    feats, mask = prompt_features(model, tok, texts, cfg)
    ids = [tok.encode(t, bos=True) for t in texts]
    for i, seq in enumerate(ids):
        hs = base(torch.tensor([seq]), output_hidden_states=True).hidden_states
        expect = 0.45 * hs[1] + 0.55 * hs[2]  # 2 layers: middle = after layer 1, last = final-normed
        assert torch.allclose(feats[i, : len(seq)], expect[0], atol=1e-5)
        assert mask[i].sum() == len(seq)
    # with the stacks on, the hidden states differ: the features above really had them off
    hs_on = model(torch.tensor([ids[0]]), output_hidden_states=True).hidden_states
    assert not torch.allclose(0.45 * hs_on[1] + 0.55 * hs_on[2], feats[0:1, : len(ids[0])], atol=1e-3)
    # and the model is left as it was: stacks on
    assert all(not layer.on.base for layer in stacked_layers(model))


def test_combination_losses_match_running_each_combination(tiny):
    from ministacks.data import Example

    model, base, tok = tiny
    exs = [Example("medical", "How much?", "", "5 mg daily", None, "t"), Example("code", "Add", "", "a + b", None, "t"),
           Example("medical", "Dose of the drug for the patient", "", "take 5 mg", None, "t")]
    data = ExampleSet(tok, exs, completion_only=True, max_len=256, batch_size=2)
    assert bool((data.scored > 0).all())  # the answers fit: every example has scored tokens
    losses = ComboLosses(model, data)
    base_data_losses = example_losses(base, ExampleSet(tok, exs, completion_only=True, max_len=256, batch_size=2))
    assert torch.allclose(losses(BASE), base_data_losses, atol=1e-5)
    set_stacks(model, StacksOn.weighted({"code": 1.0}))
    only_code = example_losses(model, data)
    set_stacks(model, StacksOn.ungated())
    assert torch.allclose(losses(("code",)), only_code)
    assert not torch.allclose(losses(("code",)), losses(("code", "medical")))
    assert all(layer.on == StacksOn.ungated() for layer in stacked_layers(model))  # restored
    # the batched per-example loss equals each example run on its own
    for i, ex in enumerate(exs):
        alone = example_losses(model, ExampleSet(tok, [ex], completion_only=True, max_len=256))
        assert float(alone[0]) == pytest.approx(float(losses(("code", "medical"))[i]), abs=1e-5)


# -- the train / val split ----------------------------------------------------------------------------------


def test_no_prompt_crosses_the_group_split():
    # rows 0..99 single prompts; 100.. mixed prompts that reuse singles' sources, some chained
    sources = [(f"s{i}",) for i in range(100)] + [(f"s{i}", f"s{i + 1}") for i in range(0, 98, 7)] + [("s3", "x")]
    train, val = group_split(sources, 0.3, seed=0)
    assert sorted(train + val) == list(range(len(sources))) and val and train
    train_src = {s for i in train for s in sources[i]}
    val_src = {s for i in val for s in sources[i]}
    assert not train_src & val_src
    assert 0.1 < len(val) / len(sources) < 0.5
    assert group_split(sources, 0.3, seed=0) == (train, val)  # stable
    assert group_split(sources, 0.3, seed=1) != (train, val)


def test_group_split_on_real_mixed_prompts():
    from ministacks.data import DataConfig, load_split, mixed_prompts

    cfg = DataConfig(max_examples=150, n_val=20, n_test=20)
    singles = [ex for d in DOMAINS for ex in load_split(d, "val", cfg)]
    mixed = mixed_prompts(cfg, "val", 5)
    sources = [(ex.key(),) for ex in singles] + [tuple(m.sources) for m in mixed]
    train, val = group_split(sources, 0.25, seed=0)
    texts = [ex.instruction for ex in singles] + [m.text for m in mixed]
    train_src = {s for i in train for s in sources[i]}
    assert not train_src & {s for i in val for s in sources[i]}
    # a source shared by a mixed prompt puts both on one side
    shared = [i for i in range(len(singles), len(sources)) if set(sources[i]) & {s for (s,) in sources[: len(singles)]}]
    assert shared, "mixed prompts are built from the same split's examples"
    for i in shared:
        side = i in val
        for j, ex in enumerate(singles):
            if ex.key() in sources[i]:
                assert (j in val) == side, texts[i]


def test_router_config_in_every_preset_is_consistent():
    from ministacks.presets import PRESETS

    for p in PRESETS.values():
        assert p.router.search in ("exhaustive", "greedy")
        assert 0 < p.router.val_fraction < 1
        assert p.router.prompts_per_domain <= p.data.n_val  # the router reads validation examples only
    assert replace(RouterConfig(), search="greedy").search == "greedy"


def test_combination_losses_refuse_examples_with_nothing_to_score(tiny):
    from ministacks.data import Example
    from ministacks.stages.route import answerable

    model, _, tok = tiny
    exs = [Example("code", "Add", "", "a + b", None, "t"), Example("code", "word " * 300, "", "x", None, "t")]
    with pytest.raises(ValueError, match="no scored token"):
        ComboLosses(model, ExampleSet(tok, exs, completion_only=True, max_len=256))
    assert answerable(tok, exs, 256) == exs[:1]


def test_the_oracles_cache_key_follows_the_answers_too(tmp_path):
    """The targets are losses of the answers: the same prompts with another answer must not reuse them."""
    from ministacks.data import Example
    from ministacks.stages.route import _targets_key

    manifest = {"base_fingerprint": "b", "stacks": []}
    a = [Example("math", "What is 2+2?", "", "4", None, "t")]
    b = [Example("math", "What is 2+2?", "", "5", None, "t")]
    assert _targets_key(tmp_path, manifest, a, RouterConfig()) == _targets_key(tmp_path, manifest, list(a), RouterConfig())
    assert _targets_key(tmp_path, manifest, a, RouterConfig()) != _targets_key(tmp_path, manifest, b, RouterConfig())
