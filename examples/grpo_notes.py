"""GRPO with TRL on a tiny note language model, rewarded by an APEX model.

A GPT-2 built from a config (32-wide, 2 layers; no download) writes phrases of up to eight note
tokens; :class:`note_lm.NoteDecoder` synthesises them to audio; :class:`ApexRewardFunction`
scores the audio with APEX and hands TRL one reward per completion. Phrases that cannot be scored
(too short: the policy stopped early) get ``--failure-value``. GRPO raises the policy's mean
APEX reward, measured before and after training on fresh samples.

    python examples/grpo_notes.py --steps 30

By default the reward model is the tiny demo checkpoint of ``note_lm.build_demo_reward_model``
(random encoder: its reward responds to pitch and note mix but is not a judgement of music; see
note_lm.py). Pass ``--model DIR`` to use a trained APEX checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import note_lm  # noqa: E402


def sample_rewards(
    policy, tokenizer, reward_fn, prompts: list[str], n: int, seed: int
) -> np.ndarray:
    """Mean-able rewards of ``n`` sampled completions per prompt (failed ones count as NaN)."""
    torch.manual_seed(seed)
    policy.eval()
    completions = []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer([prompt] * n, return_tensors="pt")
            out = policy.generate(
                **ids,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=8,
                pad_token_id=tokenizer.pad_token_id,
            )
            completions += tokenizer.batch_decode(
                out[:, ids["input_ids"].shape[1] :], skip_special_tokens=True
            )
    values = reward_fn.values(reward_fn.score_completions(completions))  # None for failures
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def main(argv: list[str] | None = None) -> dict:
    note_lm.offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="APEX checkpoint (default: the tiny demo model)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=30, help="GRPO steps")
    p.add_argument("--num-generations", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts-per-step", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument(
        "--eval-samples", type=int, default=32, help="completions per prompt to evaluate"
    )
    p.add_argument(
        "--failure-value",
        type=float,
        default=0.0,
        help="reward of phrases that cannot be scored (the bottom of 'overall', 0-1)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    out = Path(args.out or tempfile.mkdtemp(prefix="grpo_notes_"))
    model_dir = args.model or note_lm.build_demo_reward_model(out / "apex-demo", seed=args.seed)
    # A phrase too short to score (the policy stopped early) gets `failure_value` instead of None:
    # with None, TRL gives it zero advantage and the policy is never steered away from it.
    reward_fn = ApexRewardFunction(
        model_dir,
        decoder=note_lm.NoteDecoder(),
        device="cpu",
        batch_size=32,
        failure_value=args.failure_value,
    )

    tokenizer = note_lm.build_tokenizer()
    policy = note_lm.build_policy(tokenizer, seed=args.seed)
    prompts = list(note_lm.STYLES)
    before = sample_rewards(policy, tokenizer, reward_fn, prompts, args.eval_samples, args.seed + 1)

    n_rows = args.steps * args.prompts_per_step
    dataset = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(n_rows)]})
    config = GRPOConfig(
        output_dir=str(out / "grpo"),
        per_device_train_batch_size=args.num_generations * args.prompts_per_step,
        num_generations=args.num_generations,
        max_completion_length=8,
        learning_rate=args.lr,
        max_steps=args.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=args.seed,
        temperature=1.0,
        top_k=0,
        lr_scheduler_type="constant",
        shuffle_dataset=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=reward_fn,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    after = sample_rewards(policy, tokenizer, reward_fn, prompts, args.eval_samples, args.seed + 1)

    history = [h for h in trainer.state.log_history if h.get("reward") is not None]
    k = max(1, len(history) // 4)
    result = {
        "steps": trainer.state.global_step,
        "reward_before": float(np.nanmean(before)),
        "reward_after": float(np.nanmean(after)),
        "std_before": float(np.nanstd(before)),
        "failed_before": float(np.mean(np.isnan(before))),
        "failed_after": float(np.mean(np.isnan(after))),
        "train_reward_first": float(np.mean([h["reward"] for h in history[:k]])),
        "train_reward_last": float(np.mean([h["reward"] for h in history[-k:]])),
        "logged_scores": sorted(key for key in history[-1] if key.startswith(reward_fn.__name__)),
    }
    (out / "grpo_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
