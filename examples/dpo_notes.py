"""DPO with TRL on preference pairs that APEX builds from a note language model's own samples.

1. A tiny GPT-2 note model (see note_lm.py) samples N phrases per prompt.
2. :func:`score_and_build_pairs` decodes them to audio, scores them with APEX and keeps the top-k
   against the bottom-k phrases of each prompt (ties and undecodable phrases left out, counted).
3. TRL's ``DPOTrainer`` trains the policy on 3/4 of the prompts' pairs; on the held-out 1/4 the
   policy's preference margin ``log p(chosen) - log p(rejected)`` grows, i.e. what it learned
   about APEX's preferences carries over to phrases it was not trained on.
4. TRL's ``RewardTrainer`` trains a tiny text reward model on the same dataset, using its
   ``margin`` column in the Bradley-Terry loss.

    python examples/dpo_notes.py

The default reward model is the tiny demo checkpoint (random encoder; its preferences are
deterministic but not musical; see note_lm.py). Pass ``--model DIR`` for a trained one.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import note_lm  # noqa: E402


def sample_groups(policy, tokenizer, prompts: list[str], n: int, seed: int) -> list[list[str]]:
    """``n`` sampled 8-note phrases for each prompt (one batched ``generate`` call)."""
    torch.manual_seed(seed)
    policy.eval()
    batch = [prompt for prompt in prompts for _ in range(n)]
    ids = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = policy.generate(
            **ids,
            do_sample=True,
            top_k=0,
            max_new_tokens=8,
            min_new_tokens=8,
            pad_token_id=tokenizer.pad_token_id,
        )
    texts = tokenizer.batch_decode(out[:, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def completion_logprob(policy, tokenizer, prompts: list[str], completions: list[str]) -> np.ndarray:
    """``log p(completion + EOS | prompt)`` under ``policy``, tokenised as DPOTrainer does. ``[N]``"""
    policy.eval()
    starts = [len(tokenizer(p)["input_ids"]) for p in prompts]
    texts = [p + c + tokenizer.eos_token for p, c in zip(prompts, completions)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    token_logp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])[..., 0]
    # score the tokens after the prompt (targets at positions start..len-1), not the padding
    pos = torch.arange(ids.shape[1] - 1)[None, :]
    keep = (pos >= torch.tensor(starts)[:, None] - 1) & (mask[:, 1:] > 0)
    return (token_logp * keep).sum(1).numpy()


def preference_margin(policy, tokenizer, pairs) -> np.ndarray:
    """``log p(chosen) - log p(rejected)`` for every pair of a preference dataset. ``[N]``"""
    chosen = completion_logprob(policy, tokenizer, pairs["prompt"], pairs["chosen"])
    rejected = completion_logprob(policy, tokenizer, pairs["prompt"], pairs["rejected"])
    return chosen - rejected


def main(argv: list[str] | None = None) -> dict:
    note_lm.offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="APEX checkpoint (default: the tiny demo model)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--prompts", type=int, default=48, help="prompt groups to sample")
    p.add_argument("--samples", type=int, default=8, help="phrases sampled per prompt")
    p.add_argument("--top-k", type=int, default=2, help="top-k vs bottom-k pairs per prompt")
    p.add_argument("--epochs", type=float, default=2.0, help="DPO epochs over the training pairs")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument(
        "--reward-model-steps", type=int, default=4, help="RewardTrainer steps (0: skip)"
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from trl import DPOConfig, DPOTrainer

    from apex_reward.integrations.pairs import score_and_build_pairs
    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    out = Path(args.out or tempfile.mkdtemp(prefix="dpo_notes_"))
    model_dir = args.model or note_lm.build_demo_reward_model(out / "apex-demo", seed=args.seed)
    reward_fn = ApexRewardFunction(
        model_dir, decoder=note_lm.NoteDecoder(), device="cpu", batch_size=32
    )
    tokenizer = note_lm.build_tokenizer()
    policy = note_lm.build_policy(tokenizer, seed=args.seed)

    # 1-2. sample, score with APEX, build pairs (prompt groups keep their order: split by group)
    prompts = [note_lm.STYLES[i % len(note_lm.STYLES)] for i in range(args.prompts)]
    groups = sample_groups(policy, tokenizer, prompts, args.samples, args.seed + 1)
    n_train = (3 * len(prompts)) // 4
    train, train_stats = score_and_build_pairs(
        reward_fn, prompts[:n_train], groups[:n_train], strategy="top_k", top_k=args.top_k
    )
    held_out, held_stats = score_and_build_pairs(
        reward_fn, prompts[n_train:], groups[n_train:], strategy="top_k", top_k=args.top_k
    )
    train.to_json(str(out / "train_pairs.jsonl"))

    # 3. DPO
    margin_before = preference_margin(policy, tokenizer, held_out)
    train_margin_before = preference_margin(policy, tokenizer, train)
    config = DPOConfig(
        output_dir=str(out / "dpo"),
        per_device_train_batch_size=8,
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        beta=args.beta,
        max_length=32,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        lr_scheduler_type="constant",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    # the reference policy is a frozen copy of the starting policy (it was built from a config,
    # so TRL cannot reload it from a hub id)
    reference = copy.deepcopy(policy).eval()
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
    )
    trainer.train()
    margin_after = preference_margin(policy, tokenizer, held_out)
    train_margin_after = preference_margin(policy, tokenizer, train)

    result = {
        "pairs_train": len(train),
        "pairs_held_out": len(held_out),
        "pair_stats_train": train_stats.to_dict(),
        "pair_stats_held_out": held_stats.to_dict(),
        "dpo_steps": trainer.state.global_step,
        "held_out_margin_before": float(margin_before.mean()),
        "held_out_margin_after": float(margin_after.mean()),
        "held_out_accuracy_before": float((margin_before > 0).mean()),
        "held_out_accuracy_after": float((margin_after > 0).mean()),
        "train_margin_before": float(train_margin_before.mean()),
        "train_margin_after": float(train_margin_after.mean()),
    }

    # 4. a reward model on the same pairs, with TRL's margin-aware Bradley-Terry loss
    if args.reward_model_steps > 0:
        from trl import RewardConfig, RewardTrainer

        rm = note_lm.build_reward_model(tokenizer, seed=args.seed, n_embd=32)
        rm_trainer = RewardTrainer(
            model=rm,
            args=RewardConfig(
                output_dir=str(out / "reward_model"),
                per_device_train_batch_size=8,
                max_steps=args.reward_model_steps,
                learning_rate=1e-3,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                use_cpu=True,
                bf16=False,
                seed=args.seed,
                disable_tqdm=True,
            ),
            train_dataset=train,
            processing_class=tokenizer,
        )
        rm_trainer.train()
        result["reward_model_steps"] = rm_trainer.state.global_step
        result["reward_model_used_margin"] = "margin" in rm_trainer.train_dataset.column_names

    (out / "dpo_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
