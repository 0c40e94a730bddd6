"""Music Arena evaluation: classifiers under CV on a synthetic arena, the rule baseline, metrics,
calibration, the fitted preference head in the model, per-system offsets, and the score cache."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synth_music
from sklearn.metrics import roc_auc_score

from apex_reward import ApexRewardModel
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.preference import PreferenceHead, pairwise_features
from apex_reward.training.arena.cache import ScoreCache, model_fingerprint, score_audio_files
from apex_reward.training.arena.data import ArenaDataError
from apex_reward.training.arena.evaluation import (
    CLASSIFIERS,
    build_preference_data,
    cross_validate,
    reliability,
    rule_scores,
)
from apex_reward.training.arena.head import (
    fit_preference_head,
    fit_system_offsets,
    write_preference_to_checkpoint,
)
from apex_reward.training.arena.metrics import (
    evaluate,
    plot_reliability,
    plot_roc,
    write_metric_tables,
)
from apex_reward.training.arena.synthetic import TruePreference, make_synthetic_arena

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def big_arena():
    return make_synthetic_arena(3000, seed=0)


def test_logistic_cv_auc_matches_the_true_function(big_arena, tmp_path):
    """LR CV AUC within 0.03 of the true function's; rule > 0.5; the
    vocal/instrumental split covers every battle exactly once."""
    data = big_arena.to_preference_data()
    assert data.X.shape == (3000, 31)
    cv = cross_validate(data, ["logreg"], folds=10, seed=0)
    main, rules = evaluate(data, cv)
    lr = next(r for r in main if r.key == "logreg")
    true_auc = big_arena.true_auc()
    print(f"true AUC {true_auc:.4f}, logistic CV AUC {lr.auc:.4f}")
    assert abs(lr.auc - true_auc) <= 0.03
    rule = next(r for r in main if r.key == "rule_all")
    assert rule.auc > 0.5
    # every battle is tested exactly once, and falls in exactly one of vocal / instrumental
    assert sorted(np.bincount(cv.fold_of).tolist()) == sorted([300] * 10)
    assert lr.n == 3000 and lr.n_vocal + lr.n_instrumental == lr.n
    inst = big_arena.is_instrumental
    assert lr.n_instrumental == int(inst.sum()) > 0 and lr.n_vocal > 0
    s = cv.scores["logreg"]
    assert lr.auc_vocal == pytest.approx(roc_auc_score(data.y[~inst], s[~inst]))
    assert lr.auc_instrumental == pytest.approx(roc_auc_score(data.y[inst], s[inst]))
    # per-group true AUCs are also recovered
    assert abs(lr.auc_instrumental - big_arena.true_auc(inst)) <= 0.03
    assert abs(lr.auc_vocal - big_arena.true_auc(~inst)) <= 0.03
    # the rule's subsets: likes, popularity, aesthetics, all; scores are summed differences
    assert [r.key for r in rules] == [
        "rule_likes",
        "rule_popularity",
        "rule_aesthetics",
        "rule_all",
    ]
    manual = sum(data.scores_a[k] - data.scores_b[k] for k in ("streams", "likes"))
    np.testing.assert_allclose(rule_scores(data, ("streams", "likes")), manual)
    pop = next(r for r in rules if r.key == "rule_popularity")
    assert pop.accuracy == pytest.approx(np.mean((manual > 0) == data.y))


def test_every_classifier_runs_under_10_fold_cv_and_is_tabulated(tmp_path):
    """Every classifier of Table 3 runs under 10-fold CV, beats chance, and is tabulated."""
    arena = make_synthetic_arena(160, seed=3)
    data = arena.to_preference_data()
    cv = cross_validate(data, list(CLASSIFIERS), folds=10, seed=0, svm_grid={"C": [0.1, 1.0]})
    for name in CLASSIFIERS:
        assert len(cv.fold_auc[name]) == 10
        assert np.isfinite(cv.scores[name]).all() and set(np.unique(cv.predictions[name])) <= {0, 1}
    assert len(cv.best_params["svm"]) == 10
    main, rules = evaluate(data, cv)
    assert [r.key for r in main] == ["rule_all", *CLASSIFIERS]
    for r in main:
        assert r.auc > 0.6, (r.method, r.auc)  # true AUC of this arena is ~0.85
    write_metric_tables(main, tmp_path / "results", title="t")
    md = (tmp_path / "results.md").read_text()
    csv = (tmp_path / "results.csv").read_text().splitlines()
    for label in [*CLASSIFIERS.values(), "Rule: higher summed score (all)"]:
        assert label in md
    assert len(csv) == 1 + 6 and csv[0].startswith("method,key,auc,accuracy,auc_vocal")
    roc = plot_roc(data.y, {r.method: cv.scores[r.key] for r in main[1:]}, tmp_path / "roc.png")
    assert roc.read_bytes()[:8] == PNG


def test_cross_validation_needs_enough_battles_of_each_outcome():
    arena = make_synthetic_arena(30, seed=1)
    data = arena.to_preference_data()
    data.y[:] = 1
    data.y[:5] = 0
    with pytest.raises(ArenaDataError, match="at least 10 battles of each outcome"):
        cross_validate(data, ["logreg"], folds=10)


def test_reliability_and_ece(big_arena, tmp_path):
    """True probabilities are calibrated (small ECE); sharpened ones are not."""
    p_true = 1 / (1 + np.exp(-big_arena.true_logits))
    good = reliability(p_true, big_arena.labels, bins=10)
    bad = reliability(1 / (1 + np.exp(-3 * big_arena.true_logits)), big_arena.labels, bins=10)
    assert good.ece < 0.04 < bad.ece
    assert sum(good.counts) == len(big_arena)
    assert good.log_loss < bad.log_loss
    assert plot_reliability(good, tmp_path / "rel.png", title="t").read_bytes()[:8] == PNG


# ------------------------------------------------------------------------------------------------
# the fitted head inside the model


@pytest.fixture(scope="module")
def head_and_pipeline():
    arena = make_synthetic_arena(600, seed=5)
    data = arena.to_preference_data()
    return fit_preference_head(data, fitted_on={"battles": "synthetic"})


@pytest.fixture(scope="module")
def model_with_head(tiny_checkpoint, tmp_path_factory, head_and_pipeline):
    head, _ = head_and_pipeline
    d = tmp_path_factory.mktemp("head") / "ckpt"
    write_preference_to_checkpoint(tiny_checkpoint, head=head, out=d)
    return ApexRewardModel.from_pretrained(d)


def _pair(seed: int = 10, n: int = 2):
    a = torch.from_numpy(np.stack([synth_music(1.2, 24000, seed=seed + i)[0] for i in range(n)]))
    b = torch.from_numpy(
        np.stack([synth_music(1.2, 24000, seed=seed + 50 + i)[0] for i in range(n)])
    )
    return a.requires_grad_(True), b.requires_grad_(True)


def test_head_logits_equal_sklearn_decision_function_and_have_gradients(
    model_with_head, head_and_pipeline
):
    head, pipe = head_and_pipeline
    model = model_with_head
    assert model.preference_head is not None and len(head.features) == 31
    a, b = _pair()
    inst = torch.tensor([0.0, 1.0])
    logit = model.preference_logits(a, b, 24000, is_instrumental=inst)
    with torch.no_grad():
        out = model(torch.cat([a, b]), 24000)
    sa = {k: v[:2] for k, v in out.scores.items()}
    sb = {k: v[2:] for k, v in out.scores.items()}
    x = pairwise_features(sa, sb, inst, head.features, ratio_eps=head.ratio_eps).numpy()
    expected = pipe.decision_function(x)
    print("head logits", logit.tolist(), "sklearn", expected.tolist())
    np.testing.assert_allclose(logit.detach().numpy(), expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 1e-3  # a non-trivial logit
    logit.sum().backward()
    for w in (a, b):
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_head_antisymmetry_where_the_features_are(model_with_head, head_and_pipeline):
    """Swapping A and B negates the diff and diff x instrumental features exactly, inverts the
    ratios (r_ab * r_ba ~ 1) and keeps is_instrumental; so logit(a,b) - logit(b,a) =
    2 sum_diff c_j x_j / s_j + sum_ratio c_j (r_ab - r_ba) / s_j, and in logit(a,b) + logit(b,a)
    the diff features cancel. Without centring and intercept, a diff-only head is exactly
    antisymmetric."""
    from dataclasses import replace

    head, _ = head_and_pipeline
    model = model_with_head
    a, b = _pair(seed=20)
    inst = torch.tensor([1.0, 0.0])
    with torch.no_grad():
        out_a, out_b = model(a, 24000), model(b, 24000)
        ab = model.preference_logits_from_outputs(out_a, out_b, is_instrumental=inst).double()
        ba = model.preference_logits_from_outputs(out_b, out_a, is_instrumental=inst).double()
    sa, sb = out_a.scores, out_b.scores
    names = head.features
    diff = [i for i, n in enumerate(names) if n.endswith(("_diff", "_diff_x_instrumental"))]
    ratio = [i for i, n in enumerate(names) if n.endswith("_ratio")]
    assert len(diff) == 20 and len(ratio) == 10
    x_ab = pairwise_features(sa, sb, inst, names, ratio_eps=head.ratio_eps)
    x_ba = pairwise_features(sb, sa, inst, names, ratio_eps=head.ratio_eps)
    torch.testing.assert_close(x_ba[:, diff], -x_ab[:, diff], rtol=0, atol=0)
    ones = torch.ones(2, 10, dtype=torch.float64)
    torch.testing.assert_close(x_ab[:, ratio] * x_ba[:, ratio], ones, rtol=1e-4, atol=0)
    torch.testing.assert_close(x_ab[:, -1], x_ba[:, -1])
    c = torch.tensor(head.coef, dtype=torch.float64) / torch.tensor(head.scale, dtype=torch.float64)
    expected = 2 * x_ab[:, diff] @ c[diff] + (x_ab[:, ratio] - x_ba[:, ratio]) @ c[ratio]
    torch.testing.assert_close(ab - ba, expected, atol=1e-5, rtol=0)
    # ... and the diff features cancel in ab + ba: only the constant, is_instrumental and the
    # ratio terms remain
    mean = torch.tensor(head.mean, dtype=torch.float64)
    const = 2 * (head.intercept - (c * mean).sum())
    symmetric = const + 2 * c[-1] * inst.double() + (x_ab[:, ratio] + x_ba[:, ratio]) @ c[ratio]
    torch.testing.assert_close(ab + ba, symmetric, atol=1e-5, rtol=0)
    # a head over the diff terms alone, without centring or intercept, is exactly antisymmetric
    pure = PreferenceHead(
        replace(
            head,
            features=[names[i] for i in diff],
            coef=[head.coef[i] for i in diff],
            mean=None,
            scale=[head.scale[i] for i in diff],
            intercept=0.0,
        )
    )
    with torch.no_grad():
        torch.testing.assert_close(
            pure(sa, sb, is_instrumental=inst), -pure(sb, sa, is_instrumental=inst)
        )


def test_swap_augmented_head_is_nearly_order_invariant():
    data = make_synthetic_arena(1500, seed=8).to_preference_data()
    plain, _ = fit_preference_head(data)
    sym, _ = fit_preference_head(data, swap_augment=True)

    def inconsistency(h):
        t = {k: torch.from_numpy(v) for k, v in data.scores_a.items()}
        u = {k: torch.from_numpy(v) for k, v in data.scores_b.items()}
        inst = torch.from_numpy(data.instrumental.astype(np.float64))
        m = PreferenceHead(h)
        pa, pb = (
            torch.sigmoid(m(t, u, is_instrumental=inst)),
            torch.sigmoid(m(u, t, is_instrumental=inst)),
        )
        return float((pa + pb - 1).abs().mean())

    assert sym.fitted_on["swap_augment"] is True
    assert inconsistency(sym) < 0.5 * inconsistency(plain)
    assert inconsistency(sym) < 0.02


# ------------------------------------------------------------------------------------------------
# per-system offsets


def test_system_offsets_recover_hidden_system_effects():
    effects = {"s1": 0.8, "s2": 0.3, "s3": 0.0, "s4": -0.4, "s5": -0.7}
    pref = TruePreference(system_effects=effects)
    arena = make_synthetic_arena(4000, seed=11, systems=list(effects), preference=pref)
    base = TruePreference().logits(
        arena.true_scores_a, arena.true_scores_b, arena.is_instrumental
    )  # the true function without the system effects
    off = fit_system_offsets(base, arena.systems_a, arena.systems_b, arena.labels, l2=0.1)
    assert set(off) == set(effects)
    assert abs(sum(off.values())) < 1e-6  # the L2 prior makes them sum to zero
    true_c = np.array(list(effects.values())) - np.mean(list(effects.values()))
    got = np.array([off[s] for s in effects])
    print("true", true_c.round(3), "fitted", got.round(3))
    np.testing.assert_allclose(got, true_c, atol=0.15)
    strong = fit_system_offsets(base, arena.systems_a, arena.systems_b, arena.labels, l2=1e4)
    assert max(abs(v) for v in strong.values()) < 0.05  # heavy shrinkage towards 0


def test_model_applies_system_offsets_only_when_systems_are_given(tiny_model):
    a, b = _pair(seed=30)
    offsets = {"gen-x": 0.5, "gen-y": -0.25}
    old = dict(tiny_model.config.preference.system_offsets)
    tiny_model.config.preference.system_offsets = offsets
    try:
        with torch.no_grad():
            out_a, out_b = tiny_model(a, 24000), tiny_model(b, 24000)
            base = tiny_model.preference_logits_from_outputs(out_a, out_b)
            both = tiny_model.preference_logits(a, b, 24000, systems_a="gen-x", systems_b="gen-y")
            mixed = tiny_model.preference_logits_from_outputs(
                out_a, out_b, systems_a=["gen-y", None], systems_b=["gen-x", "gen-x"]
            )
            with pytest.warns(UserWarning, match="no preference offset for system 'unseen'"):
                unknown = tiny_model.preference_logits_from_outputs(
                    out_a, out_b, systems_a="unseen"
                )
        torch.testing.assert_close(both, base + 0.75, atol=1e-4, rtol=0)
        torch.testing.assert_close(mixed, base + torch.tensor([-0.75, -0.5]))
        torch.testing.assert_close(unknown, base)
        with pytest.raises(ValueError, match="got 3 for a batch of 2"):
            tiny_model.preference_logits_from_outputs(out_a, out_b, systems_a=["gen-x"] * 3)
    finally:
        tiny_model.config.preference.system_offsets = old


# ------------------------------------------------------------------------------------------------
# writing into a checkpoint


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_export_in_place_keeps_weights_and_checksum(tiny_checkpoint, tmp_path, head_and_pipeline):
    head, _ = head_and_pipeline
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    before = _sha(ckpt / "model.safetensors")
    write_preference_to_checkpoint(ckpt, head=head, system_offsets={"a": 0.1, "b": -0.1})
    assert _sha(ckpt / "model.safetensors") == before
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["weights_sha256"] == before
    assert cfg["preference"]["head"]["coef"] == head.coef
    assert cfg["preference"]["head"]["fitted_on"]["battles"] == "synthetic"
    assert cfg["preference"]["system_offsets"] == {"a": 0.1, "b": -0.1}
    assert not list(ckpt.glob("*.tmp"))
    model = ApexRewardModel.from_pretrained(ckpt)  # verifies the checksum
    assert model.preference_head is not None
    # offsets only: the head stays
    write_preference_to_checkpoint(ckpt, system_offsets={"a": 0.3})
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["preference"]["system_offsets"] == {"a": 0.3} and cfg["preference"]["head"]


def test_export_refuses_bad_targets_without_touching_the_checkpoint(
    tiny_checkpoint, tmp_path, head_and_pipeline
):
    head, _ = head_and_pipeline
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    original = (ckpt / "config.json").read_text()
    from dataclasses import replace

    broken = replace(head)
    broken.coef = head.coef[:5]  # inconsistent with 31 features
    with pytest.raises(ConfigError, match="preference.head: 5 coefficients for 31 features"):
        write_preference_to_checkpoint(ckpt, head=broken)
    assert (ckpt / "config.json").read_text() == original
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        write_preference_to_checkpoint(ckpt, head=head, out=tiny_checkpoint)
    with pytest.raises(CheckpointError, match="not a local checkpoint"):
        write_preference_to_checkpoint(tmp_path / "nothing", head=head)
    (ckpt / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        write_preference_to_checkpoint(ckpt, head=head)
    assert (ckpt / "config.json").read_text() == original


# ------------------------------------------------------------------------------------------------
# the score cache: each audio content scored once, across runs


def test_score_cache_scores_each_content_once(tiny_model, tmp_path, monkeypatch):
    import soundfile as sf

    files = []
    for i in range(4):
        p = tmp_path / f"s{i}.wav"
        sf.write(p, synth_music(1.5, 24000, seed=70 + i).T, 24000)
        files.append(p)
    dup = tmp_path / "copy_of_s0.wav"
    dup.write_bytes(files[0].read_bytes())
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"not audio at all")
    paths = [*files, dup, broken, files[1]]  # a repeated path too

    calls: list[int] = []
    real_score = ApexRewardModel.score

    def spy(self, inputs, **kw):
        calls.append(len(inputs))
        return real_score(self, inputs, **kw)

    monkeypatch.setattr(ApexRewardModel, "score", spy)
    fp = model_fingerprint(tiny_model)
    with ScoreCache(tmp_path / "cache.sqlite") as cache:
        res1, st1 = score_audio_files(tiny_model, paths, cache=cache, fingerprint=fp)
    assert (st1.files, st1.contents, st1.cache_hits, st1.scored, st1.failed) == (6, 5, 0, 5, 1)
    assert sum(calls) == 5
    assert res1[dup].scores == res1[files[0]].scores
    assert res1[broken].error_type == "AudioDecodeError"
    calls.clear()
    with ScoreCache(tmp_path / "cache.sqlite") as cache:  # a new process would see the same file
        res2, st2 = score_audio_files(tiny_model, paths, cache=cache, fingerprint=fp)
        assert len(cache) == 5
    assert (st2.cache_hits, st2.scored, st2.failed) == (5, 0, 1)
    assert calls == []  # the model was not called at all
    assert {str(p): r.scores for p, r in res2.items()} == {
        str(p): r.scores for p, r in res1.items()
    }
    # other weights have another fingerprint: nothing is shared
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        next(iter(other.head.heads.values()))[-1].bias.add_(1.0)
    assert model_fingerprint(other) != fp
    with ScoreCache(tmp_path / "cache.sqlite") as cache:
        res3, st3 = score_audio_files(other, files[:2], cache=cache)
    assert (st3.cache_hits, st3.scored) == (0, 2)
    assert res3[files[0]].scores != res1[files[0]].scores
    assert model_fingerprint(tiny_model) == fp  # deterministic


def test_score_cache_keeps_audio_failures_and_retries_others(tiny_model, tmp_path, monkeypatch):
    """An AudioError is a property of the bytes (cached by its type name); any other failure
    (out of memory, a bug) is retried next run. Every error class in apex_reward.errors maps back
    from its name."""
    import inspect
    from types import SimpleNamespace

    from apex_reward import errors

    classes = {
        n for n, c in vars(errors).items() if inspect.isclass(c) and issubclass(c, errors.ApexError)
    }
    assert set(errors.ERROR_TYPES) == classes
    assert errors.error_class("AudioTooShortError") is errors.AudioTooShortError
    assert errors.error_class("RuntimeError") is None and errors.error_class(None) is None

    paths = [tmp_path / f"clip{i}.wav" for i in range(3)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 100)
    outcomes = {
        paths[0].name: ("AudioTooShortError", "0.1 s is shorter than 1 s"),
        paths[1].name: ("RuntimeError", "CUDA out of memory"),
        paths[2].name: ("ConfigError", "not an audio property"),
    }

    def fake_score(self, inputs, **kw):
        return [
            SimpleNamespace(
                ok=False,
                scores={},
                error=outcomes[Path(p).name][1],
                error_type=outcomes[Path(p).name][0],
                duration_s=None,
            )
            for p in inputs
        ]

    monkeypatch.setattr(ApexRewardModel, "score", fake_score)
    with ScoreCache(tmp_path / "cache.sqlite") as cache:
        res, stats = score_audio_files(tiny_model, paths, cache=cache, fingerprint="fp")
        assert stats.failed == 3 and len(cache) == 1
        cached = cache.get_many("fp", [res[p].sha256 for p in paths])
    assert [c.error_type for c in cached.values()] == ["AudioTooShortError"]


def test_build_preference_data_checks_lengths():
    with pytest.raises(ArenaDataError, match="differ in length"):
        build_preference_data({"likes": [1.0, 2.0]}, {"likes": [1.0]}, [0, 1], [1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        d = build_preference_data({"likes": [1.0, 2.0]}, {"likes": [2.0, 1.0]}, [0, 1], [0, 1])
    assert d.feature_names == [
        "likes_diff",
        "likes_ratio",
        "likes_diff_x_instrumental",
        "is_instrumental",
    ]
    np.testing.assert_allclose(d.X[:, 0], [-1.0, 1.0])
    np.testing.assert_allclose(d.X[:, 2], [0.0, 1.0])


def test_popularity_only_models_get_their_own_features_and_rules():
    arena = make_synthetic_arena(400, seed=12)
    keep = ("streams", "likes", "popularity", "overall")
    data = build_preference_data(
        {k: arena.scores_a[k] for k in keep},
        {k: arena.scores_b[k] for k in keep},
        arena.is_instrumental,
        arena.labels,
    )
    assert len(data.feature_names) == 13
    cv = cross_validate(data, ["logreg"], folds=10, seed=0)
    main, rules = evaluate(data, cv)
    assert [r.key for r in rules] == ["rule_likes", "rule_popularity"]
    assert [r.key for r in main] == ["rule_popularity", "logreg"]
    head, pipe = fit_preference_head(data)
    assert head.features == data.feature_names
    np.testing.assert_allclose(
        PreferenceHead(head)(
            {k: torch.from_numpy(v) for k, v in data.scores_a.items()},
            {k: torch.from_numpy(v) for k, v in data.scores_b.items()},
            is_instrumental=torch.from_numpy(data.instrumental.astype(np.float64)),
        ).numpy(),
        pipe.decision_function(data.X),
        atol=1e-9,
    )
