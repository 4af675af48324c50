"""``WRPOTrainer``: the transformers Trainer with the WRPO loss (so accelerate, DeepSpeed and FSDP work).

Per step it forwards the collated ``[ws; wt; l]`` rows through the policy, takes the reference log-probs from
the batch (precomputed and cached, :mod:`fuselab.wrpo.refcache`) or from a per-step forward of a frozen
reference model, and applies :func:`fuselab.wrpo.loss.wrpo_loss` with α from the schedule at the current
optimiser step. α uses ``state.global_step`` (completed updates) and ``state.max_steps`` (the real total the
Trainer computed from the sharded dataloader, gradient accumulation and ``max_steps``), so it is constant
within an accumulation window and resumes correctly from a checkpoint.

Logged (averaged over the steps since the last log, gathered over processes): ``alpha``, the three implicit
rewards and the weighted one, margins, element-wise accuracies, mean policy log-probs and σ(−z); evaluation
logs the same with an ``eval_`` prefix.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from fuselab.wrpo.config import LossConfig
from fuselab.wrpo.data import COLUMN_NAMES
from fuselab.wrpo.forward import forward_logps
from fuselab.wrpo.loss import wrpo_loss
from fuselab.wrpo.schedule import alpha_at


def disable_dropout(model: nn.Module) -> None:
    """Preference losses compare log-probs of the same model under two weights; dropout adds noise to both."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def columns_for(loss: LossConfig) -> tuple[str, ...]:
    """Responses that carry weight: a static α of 0 or 1 is DPO and needs only two of the three."""
    if loss.alpha_schedule == "constant" and loss.alpha in (0.0, 1.0):
        return ("wt", "l") if loss.alpha == 0.0 else ("ws", "l")
    return COLUMN_NAMES


class WRPOTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        loss_config: LossConfig,
        ref_model: nn.Module | None = None,
        columns: Sequence[str] = COLUMN_NAMES,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_config = loss_config
        self.columns = tuple(columns)
        self._column_mask = torch.tensor([float(c in self.columns) for c in COLUMN_NAMES])
        # The loss is a mean over the micro-batch; the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._stored: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        disable_dropout(self.model)
        self.ref_model = self._prepare_ref(ref_model) if ref_model is not None else None

    # ------------------------------------------------------------------------------------------- reference

    def _prepare_ref(self, ref: nn.Module) -> nn.Module:
        ref.eval()
        ref.requires_grad_(False)
        disable_dropout(ref)
        if self.is_deepspeed_enabled:
            return _prepare_deepspeed_ref(ref, self.accelerator)
        if self.is_fsdp_enabled:
            return self.accelerator.prepare_model(ref, evaluation_mode=True)
        return ref.to(self.accelerator.device)

    def reference_logps(self, inputs: dict[str, Any]) -> torch.Tensor:
        ref = inputs.get("ref_logps")
        if ref is None:
            if self.ref_model is None:
                raise RuntimeError("no reference: the batch has no ref_logps and no ref_model was given")
            with torch.no_grad():
                ref = forward_logps(self.ref_model, inputs, self.columns)
        return ref * self._column_mask.to(ref.device, ref.dtype)

    # ------------------------------------------------------------------------------------------------ loss

    def current_alpha(self) -> float:
        c = self.loss_config
        return alpha_at(
            self.state.global_step, max(self.state.max_steps, 1), c.alpha, c.alpha_schedule, c.reach_final
        )

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, Any]]:
        policy = forward_logps(model, inputs, self.columns)
        ref = self.reference_logps(inputs)
        loss, metrics = wrpo_loss(
            policy, ref, self.current_alpha(), self.loss_config.beta, self.loss_config.label_smoothing
        )
        self._store("train" if model.training else "eval", metrics, policy.device)
        if return_outputs:
            return loss, {"policy_logps": policy.detach(), "ref_logps": ref.detach()}
        return loss

    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ------------------------------------------------------------------------------------------------- log

    def _store(self, mode: str, metrics: dict[str, torch.Tensor], device: torch.device) -> None:
        keys = list(metrics)
        values = torch.stack([metrics[k].detach().float().to(device) for k in keys])
        gathered = self.accelerator.gather(values[None]).reshape(-1, len(keys)).mean(0)
        for k, v in zip(keys, gathered.tolist()):
            self._stored[mode][k].append(v)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for k, vals in self._stored[mode].items():
            if vals:
                logs[f"{prefix}{k}"] = sum(vals) / len(vals)
        self._stored[mode].clear()
        super().log(logs, start_time)


def _prepare_deepspeed_ref(model: nn.Module, accelerator: Any) -> nn.Module:  # pragma: no cover (GPU)
    """Wrap the frozen reference as a DeepSpeed inference engine sharing the policy's ZeRO stage (the pattern
    TRL uses). Untested on CPU; precomputed reference log-probs avoid it entirely."""
    import deepspeed

    cfg = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    hidden = getattr(model.config, "hidden_size", None)
    if stage == 3 and hidden:
        cfg["zero_optimization"].update(
            {
                "reduce_bucket_size": hidden * hidden,
                "stage3_param_persistence_threshold": 10 * hidden,
                "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            }
        )
    if stage != 3:
        cfg["zero_optimization"] = {"stage": 0}
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    engine, *_ = deepspeed.initialize(model=model, config=cfg)
    engine.eval()
    return engine
