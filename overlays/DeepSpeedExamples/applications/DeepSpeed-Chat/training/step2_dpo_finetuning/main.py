#!/usr/bin/env python
# rlhf-overlay: REPLACES applications/DeepSpeed-Chat/training/step2_dpo_finetuning/main.py at the pin (83757d9c).
# Based on that file, with the same kind of fixes as our step-2 reward-model overlay, plus DPO-specific ones:
#   - --dtype fp32 (the default on CPU); ZeRO-3 / fp16 refused on CPU with a clear message; a local model folder
#     is checked to exist before anything loads (run_checks.py);
#   - end-of-conversation token = the tokenizer's EOS, and it is now passed to the dataset (upstream set
#     args.end_of_conversation_token but never passed it, so the literal text "<|endoftext|>" was appended to
#     every answer, which LLaMA2 tokenizes into pieces); --end_of_conversation_token to override;
#   - local JSON/JSONL preference data (patch 0004) documented in --data_path;
#   - the BLOOM ln_f reset copied from the reward model is gone: it crashed on any bigscience/bloom-* path
#     (`model.rwtranrsformer` does not exist on a causal LM) and, as DPO replaces no head, it would only have
#     damaged the policy relative to its reference;
#   - the reference model starts identical to the policy (upstream initialised the rows the tokenizer adds,
#     e.g. LLaMA's [PAD], with different random values in the two, so rewards were not 0 before training);
#   - the log-prob mask comes from the attention mask (upstream used `input_ids != pad_token_id`, which drops
#     the end token of models whose pad token is their EOS); --compute_fp32_loss computes the log-probs in fp32
#     (upstream's causal_lm_model_to_fp32_loss only changes the LM loss with labels, which DPO never computes);
#   - evaluation over all eval pairs (upstream reported the rewards of the last batch only), with preference
#     accuracy (chosen implicit reward beta*log(pi/pi_ref) above the rejected one), reward margin, and the
#     policy's own accuracy (chosen log-prob above rejected); --eval_interval / --eval_iters;
#   - tensorboard scalars in the output folder (train/ and eval/ loss, acc, reward_margin, chosen_reward,
#     rejected_reward; dpo/loss, dpo/acc, dpo/reward_margin as the project's common names) and eval_results.json
#     with the evaluation before and after training;
#   - --max_steps; progress lines (loss, accuracy, seconds per step) every --print_interval steps instead of a
#     throughput line per step; step times in the results.
# Copyright (c) Microsoft Corporation.
# SPDX-License-Identifier: Apache-2.0

# DeepSpeed Team
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from transformers import (
    AutoModelForCausalLM,
    SchedulerType,
    get_scheduler,
)

import deepspeed
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.accelerator import get_accelerator

from dschat.utils.data.data_utils import create_prompt_dataset, DataCollatorReward
from dschat.utils.utils import print_rank_0, to_device, save_hf_format, set_random_seed, get_optimizer_grouped_parameters, save_zero_three_model, load_hf_tokenizer
from dschat.utils.ds_utils import get_train_ds_config, get_eval_ds_config
from dschat.utils.module.lora import convert_linear_layer_to_lora, convert_lora_to_linear_layer, only_optimize_lora_parameters, make_model_gradient_checkpointing_compatible
from dschat.utils.model.model_utils import create_hf_model
from dschat.utils import run_checks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=
        "(Step 2, DPO) Direct Preference Optimization of an SFT model on preference pairs (prompt, chosen, "
        "rejected), against a frozen copy of that model as the reference")
    parser.add_argument('--data_path',
                        nargs='*',
                        default=['Dahoas/rm-static'],
                        help='Path to the training dataset. Accepted format:'
                        '1) a single data path, 2) multiple datasets in the'
                        'form: dataset1-path dataset2-path ... A data path is a '
                        'dataset name (Dahoas/rm-static), a local .json/.jsonl '
                        'file, or a folder with train.jsonl and eval.jsonl '
                        '(rows: prompt, chosen, rejected).')
    parser.add_argument('--data_split',
                        type=str,
                        default='2,4,4',
                        help='Comma-separated list of proportions for training '
                        'phase 1, 2, and 3 data. For example the split `6,2,2` '
                        'will use 60%% of data for phase 1, 20%% for phase 2 '
                        'and 20%% for phase 3 (this step uses the phase-2 share).')
    parser.add_argument(
        '--data_output_path',
        type=str,
        default='/tmp/data_files/',
        help=
        'Where to store the data-related files such as shuffle index. This needs to be on a local storage of a node (not on a shared storage)'
    )
    parser.add_argument(
        "--model_name_or_path",
        type=str,
        help=
        "Path to pretrained model or model identifier from huggingface.co/models.",
        required=True,
    )
    parser.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=16,
        help="Batch size (per device) for the training dataloader.",
    )
    parser.add_argument(
        "--per_device_eval_batch_size",
        type=int,
        default=16,
        help="Batch size (per device) for the evaluation dataloader.",
    )
    parser.add_argument(
        "--max_seq_len",
        type=int,
        default=512,
        help="The maximum sequence length.",
    )
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=1e-3,
        help=
        "Initial learning rate (after the potential warmup period) to use.",
    )
    parser.add_argument("--weight_decay",
                        type=float,
                        default=0.,
                        help="Weight decay to use.")
    parser.add_argument("--num_train_epochs",
                        type=int,
                        default=1,
                        help="Total number of training epochs to perform.")
    # Reference: https://github.com/eric-mitchell/direct-preference-optimization/blob/main/trainers.py
    parser.add_argument(
        "--beta",
        type=float,
        default=1e-1,
        help=
        "Temperature parameter for the DPO loss, typically something in the range of 0.1 to 0.5. We ignore the reference model as beta -> 0."
    )
    parser.add_argument(
        "--label_smoothing",
        type=float,
        default=0.0,
        help=
        "conservativeness for DPO loss, which assumes that preferences are noisy (flipped with probability label_smoothing)"
    )
    parser.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=1,
        help=
        "Number of updates steps to accumulate before performing a backward/update pass.",
    )
    parser.add_argument(
        "--lr_scheduler_type",
        type=SchedulerType,
        default="cosine",
        help="The scheduler type to use.",
        choices=[
            "linear", "cosine", "cosine_with_restarts", "polynomial",
            "constant", "constant_with_warmup"
        ],
    )
    parser.add_argument(
        "--num_warmup_steps",
        type=int,
        default=0,
        help="Number of steps for the warmup in the lr scheduler.")
    parser.add_argument("--output_dir",
                        type=str,
                        default=None,
                        help="Where to store the model.")
    parser.add_argument("--seed",
                        type=int,
                        default=1234,
                        help="A seed for reproducible training.")
    parser.add_argument("--local_rank",
                        type=int,
                        default=-1,
                        help="local_rank for distributed training on gpus")
    parser.add_argument('--gradient_checkpointing',
                        action='store_true',
                        help='Enable HF gradient checkpointing for model.')
    parser.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="If dropout configured, use it. "
        "Otherwise, keep the default dropout configuration of the model.")
    # deepspeed features
    parser.add_argument('--offload',
                        action='store_true',
                        help='Enable ZeRO Offload techniques.')
    parser.add_argument(
        '--dtype',
        type=str,
        default=None,
        choices=list(run_checks.SUPPORTED_DTYPES),
        help='Training data type (default: fp16 on GPU as upstream, fp32 on CPU '
        'where fp16 is unsupported; fp32 works everywhere)')
    parser.add_argument(
        '--offload_reference_model',
        action='store_true',
        help='Enable ZeRO Offload techniques for reference model.')
    parser.add_argument(
        '--zero_stage',
        type=int,
        default=0,
        help='ZeRO optimization stage for Actor model (and clones).')
    ## LoRA for efficient training setting
    parser.add_argument("--lora_dim",
                        type=int,
                        default=0,
                        help="If > 0, use LoRA for efficient training.")
    parser.add_argument("--lora_module_name",
                        type=str,
                        default="decoder.layers.",
                        help="The scope of LoRA (LLaMA: layers.).")
    parser.add_argument('--only_optimize_lora',
                        action='store_true',
                        help='Only optimize the LoRA parameters.')
    parser.add_argument(
        "--lora_learning_rate",
        type=float,
        default=5e-4,
        help=
        "Initial LoRA learning rate (after the potential warmup period) to use."
    )
    # Evaluation
    parser.add_argument(
        "--eval_interval",
        type=int,
        default=0,
        help="If > 0, also evaluate every this many optimizer steps (always: "
        "before training and after every epoch)")
    parser.add_argument(
        "--eval_iters",
        type=int,
        default=0,
        help="If > 0, evaluate on at most this many eval batches; 0 = all")
    parser.add_argument(
        "--max_steps",
        type=int,
        default=0,
        help="If > 0, stop after this many optimizer steps (the lr schedule "
        "is laid out for that many); 0 = all epochs")
    parser.add_argument(
        "--print_interval",
        type=int,
        default=10,
        help="Print loss, accuracy and seconds per step every this many steps (0: never)")
    ## low precision
    parser.add_argument(
        '--compute_fp32_loss',
        action='store_true',
        help='Relevant for low precision dtypes (fp16, bf16, etc.). '
        'If specified, the log-probabilities and the DPO loss are calculated in fp32.')
    ## Tensorboard logging
    parser.add_argument(
        '--enable_tensorboard',
        action='store_true',
        help='Also enable DeepSpeed\'s own tensorboard monitor (our scalars '
        'train/*, eval/*, dpo/* are always written)')
    parser.add_argument(
        '--tensorboard_path',
        type=str,
        default=None,
        help='Folder for the tensorboard event files (default: '
        '<output_dir>/tensorboard, or step2_tensorboard without --output_dir)')
    ## Tokenizer
    parser.add_argument(
        "--end_of_conversation_token",
        type=str,
        default=None,
        help="Appended to every chosen/rejected text; default: the tokenizer's "
        "EOS token (</s> for LLaMA2). Upstream meant <|endoftext|>.")
    parser.add_argument(
        "--add_eot_token",
        action='store_true',
        help="Add the end-of-conversation token as an additional special token "
        "to the tokenizer (only useful with a custom --end_of_conversation_token)")
    ## Print loss
    parser.add_argument('--print_loss',
                        action='store_true',
                        help='Prints loss at each step.')
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)

    # Validate settings (before any model is loaded).
    run_checks.check_model_path(args.model_name_or_path,
                                "--model_name_or_path")
    args.dtype = run_checks.resolve_dtype(args.dtype)
    run_checks.check_cpu_limits(args.dtype,
                                {"--zero_stage": args.zero_stage})
    if args.beta <= 0:
        raise run_checks.SettingError(
            f"--beta {args.beta}: must be > 0 (typically 0.1 to 0.5)")
    if not 0 <= args.label_smoothing < 0.5:
        raise run_checks.SettingError(
            f"--label_smoothing {args.label_smoothing}: must be in [0, 0.5)")
    if args.tensorboard_path is None:
        args.tensorboard_path = os.path.join(
            args.output_dir,
            "tensorboard") if args.output_dir else "step2_tensorboard"
    return args


# Reference: https://github.com/huggingface/trl/blob/main/trl/trainer/dpo_trainer.py
def get_batch_logps(logits, input_ids, label_mask):
    labels = input_ids.clone() * label_mask
    assert logits.shape[:-1] == labels.shape, \
        "Logits (batch and sequence length dim) and labels must have the same shape."
    labels = labels[:, 1:]
    label_mask = label_mask[:, 1:]
    logits = logits[:, :-1, :]
    per_token_logps = torch.gather(logits.log_softmax(-1),
                                   dim=2,
                                   index=labels.unsqueeze(2)).squeeze(2)
    return (per_token_logps * label_mask).sum(-1)


def answer_mask(batch):
    """1 on the tokens whose log-probability counts: from the first token where chosen and rejected differ
    (their common prompt and shared answer prefix cancel out) to the end of each text, padding excluded.
    The collator stacks the chosen rows first, then the rejected rows."""
    input_ids = batch['input_ids']
    batch_size = input_ids.shape[0] // 2
    chosen_input_ids = input_ids[:batch_size]
    rejected_input_ids = input_ids[batch_size:]
    label_mask = batch['attention_mask'].clone().int()
    for i in range(batch_size):
        divergence_ind = (chosen_input_ids[i] !=
                          rejected_input_ids[i]).nonzero().squeeze(-1)
        if len(divergence_ind) > 0:
            divergence_ind = divergence_ind[0]
        else:
            divergence_ind = 0
        label_mask[i][:divergence_ind] = 0
        label_mask[i + batch_size][:divergence_ind] = 0
    return label_mask


def main():
    args = parse_args()

    if args.local_rank == -1:
        device = torch.device(get_accelerator().device_name())
    else:
        get_accelerator().set_device(args.local_rank)
        device = torch.device(get_accelerator().device_name(), args.local_rank)
        # Initializes the distributed backend which will take care of sychronizing nodes/GPUs
        # torch.distributed.init_process_group(backend='nccl')
        deepspeed.init_distributed()

    args.global_rank = torch.distributed.get_rank()

    writer = None
    if args.global_rank <= 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.tensorboard_path)
        print_rank_0(f"Tensorboard scalars: {args.tensorboard_path}",
                     args.global_rank)

    ds_config = get_train_ds_config(offload=args.offload,
                                    dtype=args.dtype,
                                    stage=args.zero_stage,
                                    enable_tensorboard=args.enable_tensorboard,
                                    tb_path=args.tensorboard_path,
                                    tb_name="step2_model")
    ds_config[
        'train_micro_batch_size_per_gpu'] = args.per_device_train_batch_size
    ds_config[
        'train_batch_size'] = args.per_device_train_batch_size * torch.distributed.get_world_size(
        ) * args.gradient_accumulation_steps

    # If passed along, set the training seed now.
    set_random_seed(args.seed)

    torch.distributed.barrier()

    # load_hf_tokenizer will get the correct tokenizer and set padding tokens based on the model family
    additional_special_tokens = args.end_of_conversation_token if args.add_eot_token else None
    tokenizer = load_hf_tokenizer(args.model_name_or_path,
                                  fast_tokenizer=True,
                                  add_special_tokens=additional_special_tokens)
    if args.end_of_conversation_token is None:
        if tokenizer.eos_token is None:
            raise run_checks.SettingError(
                f"the tokenizer of {args.model_name_or_path} has no EOS token; pass "
                f"--end_of_conversation_token")
        args.end_of_conversation_token = tokenizer.eos_token
    print_rank_0(
        f"dtype={args.dtype} zero_stage={args.zero_stage} beta={args.beta} "
        f"end_of_conversation_token={args.end_of_conversation_token!r}",
        args.global_rank)

    # Same seed right before each model is made: create_hf_model resizes the embeddings and LM head for the
    # tokenizer (LLaMA gets a new [PAD] row), and those new rows are randomly initialised. Upstream drew them
    # twice from one random stream, so the reference differed from the policy's starting point and the
    # implicit rewards were not zero before training.
    set_random_seed(args.seed)
    model = create_hf_model(AutoModelForCausalLM,
                            args.model_name_or_path,
                            tokenizer,
                            ds_config,
                            dropout=args.dropout)

    # DS Config for ref model
    ref_zero_stage = args.zero_stage
    if ref_zero_stage != 3:
        # If it is ZeRO-3 then we use it for everything, otherwise assume we have enough memory for ref model
        ref_zero_stage = 0
    ref_ds_config = get_eval_ds_config(args.offload_reference_model,
                                       args.dtype, ref_zero_stage)
    ref_ds_config[
        'train_micro_batch_size_per_gpu'] = args.per_device_train_batch_size
    ref_ds_config[
        'train_batch_size'] = args.per_device_train_batch_size * torch.distributed.get_world_size(
        ) * args.gradient_accumulation_steps
    ref_ds_eval_config = get_eval_ds_config(offload=False,
                                            dtype=args.dtype,
                                            stage=ref_zero_stage)
    ref_ds_eval_config[
        'train_micro_batch_size_per_gpu'] = args.per_device_train_batch_size
    ref_ds_eval_config[
        'train_batch_size'] = args.per_device_train_batch_size * torch.distributed.get_world_size(
        ) * args.gradient_accumulation_steps
    set_random_seed(args.seed)
    ref_model = create_hf_model(AutoModelForCausalLM,
                                args.model_name_or_path,
                                tokenizer,
                                ref_ds_eval_config,
                                dropout=args.dropout)
    # End of DS config for ref model

    # (Upstream reset BLOOM's ln_f here, copied from the reward model, where a new head is put on top. DPO
    # keeps the LM head, so the reset would only damage the policy; and it crashed: `rwtranrsformer`.)

    if args.lora_dim > 0:
        model = convert_linear_layer_to_lora(model, args.lora_module_name,
                                             args.lora_dim)
        if args.only_optimize_lora:
            model = only_optimize_lora_parameters(model)
            model = make_model_gradient_checkpointing_compatible(model)

    # Prepare the data
    train_phase = 2
    train_dataset, eval_dataset = create_prompt_dataset(
        args.local_rank,
        args.data_path,
        args.data_split,
        args.data_output_path,
        train_phase,
        args.seed,
        tokenizer,
        args.max_seq_len,
        end_of_conversation_token=args.end_of_conversation_token)

    # DataLoaders creation:
    data_collator = DataCollatorReward()
    if args.local_rank == -1:
        train_sampler = RandomSampler(train_dataset)
        eval_sampler = SequentialSampler(eval_dataset)
    else:
        train_sampler = DistributedSampler(train_dataset)
        eval_sampler = DistributedSampler(eval_dataset)
    train_dataloader = DataLoader(train_dataset,
                                  collate_fn=data_collator,
                                  sampler=train_sampler,
                                  batch_size=args.per_device_train_batch_size)
    eval_dataloader = DataLoader(eval_dataset,
                                 collate_fn=data_collator,
                                 sampler=eval_sampler,
                                 batch_size=args.per_device_eval_batch_size)

    def dpo_forward(model, ref_model, batch, **model_kwargs):
        """Per-pair summed answer log-probs of policy and reference, the DPO loss (mean) and the pair's
        implicit rewards beta * log(pi / pi_ref)."""
        batch_size = batch['input_ids'].shape[0] // 2
        label_mask = answer_mask(batch)
        outputs = model(**batch, **model_kwargs)
        with torch.no_grad():
            ref_outputs = ref_model(**batch)
        logits, ref_logits = outputs.logits, ref_outputs.logits
        if args.compute_fp32_loss:
            logits, ref_logits = logits.float(), ref_logits.float()
        logps = get_batch_logps(logits, batch['input_ids'], label_mask)
        ref_logps = get_batch_logps(ref_logits, batch['input_ids'],
                                    label_mask)

        chosen_logps = logps[:batch_size]
        rejected_logps = logps[batch_size:]
        ref_chosen_logps = ref_logps[:batch_size]
        ref_rejected_logps = ref_logps[batch_size:]

        logits = args.beta * ((chosen_logps - ref_chosen_logps) -
                              (rejected_logps - ref_rejected_logps))
        loss = (- F.logsigmoid(logits) * (1 - args.label_smoothing) - \
                F.logsigmoid(-logits) * args.label_smoothing).mean(0)
        chosen_rewards = args.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = args.beta * (rejected_logps -
                                        ref_rejected_logps).detach()
        return loss, chosen_rewards, rejected_rewards, (
            chosen_logps - rejected_logps).detach()

    def evaluation(model, ref_model, eval_dataloader, eval_iters):
        """Means over all eval pairs (every rank's), not over the last batch as upstream reported."""
        model.eval()
        # sums: loss * pairs, pairs, correct, chosen reward, rejected reward, policy prefers chosen
        totals = torch.zeros(6, device=device, dtype=torch.float64)
        for step, batch in enumerate(eval_dataloader):
            batch = to_device(batch, device)
            with torch.no_grad():
                loss, chosen, rejected, policy_margin = dpo_forward(
                    model, ref_model, batch)
            n = chosen.shape[0]
            totals += torch.stack([
                loss.double() * n,
                torch.tensor(n, dtype=torch.float64, device=device),
                (chosen > rejected).sum().double(),
                chosen.double().sum(),
                rejected.double().sum(),
                (policy_margin > 0).sum().double()
            ])
            if eval_iters and step + 1 >= eval_iters:
                break
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals,
                                         op=torch.distributed.ReduceOp.SUM)
        model.train()
        pairs = totals[1].item()
        if pairs == 0:  # upstream crashed here on an empty eval split
            print_rank_0("No evaluation rows: skipping the evaluation",
                         args.global_rank)
            nan = float("nan")
            return {"loss": nan, "acc": nan, "chosen_reward": nan,
                    "rejected_reward": nan, "reward_margin": nan,
                    "policy_acc": nan, "pairs": 0}
        chosen_reward = totals[3].item() / pairs
        rejected_reward = totals[4].item() / pairs
        return {
            "loss": totals[0].item() / pairs,
            "acc": totals[2].item() / pairs,
            "chosen_reward": chosen_reward,
            "rejected_reward": rejected_reward,
            "reward_margin": chosen_reward - rejected_reward,
            "policy_acc": totals[5].item() / pairs,
            "pairs": int(pairs),
        }

    def log_eval(global_step, metrics, label):
        print_rank_0(
            f"{label}: loss {metrics['loss']:.4f}, acc {metrics['acc']:.3f} (chosen reward above "
            f"rejected), reward margin {metrics['reward_margin']:.4f} (chosen {metrics['chosen_reward']:.4f}, "
            f"rejected {metrics['rejected_reward']:.4f}), policy acc {metrics['policy_acc']:.3f}, "
            f"{metrics['pairs']} pairs", args.global_rank)
        if writer is None:
            return
        for key in ("loss", "acc", "chosen_reward", "rejected_reward",
                    "reward_margin", "policy_acc"):
            writer.add_scalar(f'eval/{key}', metrics[key], global_step)
        writer.add_scalar('dpo/acc', metrics['acc'], global_step)
        writer.add_scalar('dpo/reward_margin', metrics['reward_margin'],
                          global_step)
        writer.flush()

    # Split weights in two groups, one with weight decay and the other not.
    optimizer_grouped_parameters = get_optimizer_grouped_parameters(
        model, args.weight_decay, args.lora_learning_rate)

    AdamOptimizer = DeepSpeedCPUAdam if args.offload else FusedAdam
    optimizer = AdamOptimizer(optimizer_grouped_parameters,
                              lr=args.learning_rate,
                              betas=(0.9, 0.95))

    num_update_steps_per_epoch = math.ceil(
        len(train_dataloader) / args.gradient_accumulation_steps)
    num_training_steps = args.num_train_epochs * num_update_steps_per_epoch
    if args.max_steps:
        num_training_steps = min(num_training_steps, args.max_steps)
    lr_scheduler = get_scheduler(
        name=args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps,
        num_training_steps=num_training_steps,
    )

    model, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        args=args,
        config=ds_config,
        lr_scheduler=lr_scheduler,
        dist_init_required=True)
    ref_model, *_ = deepspeed.initialize(model=ref_model, config=ref_ds_config)
    ref_model.eval()

    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()

    # Train!
    print_rank_0("***** Running training *****", args.global_rank)
    print_rank_0(
        f"***** Evaluating rewards, Epoch {0}/{args.num_train_epochs} *****",
        args.global_rank)
    before = evaluation(model, ref_model, eval_dataloader, args.eval_iters)
    log_eval(0, before, "before training")
    metrics = before
    evaluated_at = 0  # optimizer step of the last evaluation (not repeated at the epoch end)

    total_micro_steps = 0
    total_steps = 0
    step_times = []
    for epoch in range(args.num_train_epochs):
        print_rank_0(
            f"Beginning of Epoch {epoch+1}/{args.num_train_epochs}, Total Micro Batches {len(train_dataloader)}",
            args.global_rank)
        if isinstance(train_sampler, DistributedSampler):
            train_sampler.set_epoch(epoch)
        model.train()
        mean_loss = 0
        step = -1
        for step, batch in enumerate(train_dataloader):
            start = time.time()
            batch = to_device(batch, device)
            loss, chosen, rejected, _ = dpo_forward(model,
                                                    ref_model,
                                                    batch,
                                                    use_cache=False)
            if args.print_loss:
                print(
                    f"Epoch: {epoch}, Step: {step}, Rank: {torch.distributed.get_rank()}, loss = {loss}"
                )
            model.backward(loss)
            model.step()
            loss_value = loss.item()
            mean_loss += loss_value
            step_times.append(time.time() - start)
            total_micro_steps += 1
            gas_boundary = (total_micro_steps %
                            args.gradient_accumulation_steps == 0)
            total_steps = total_micro_steps // args.gradient_accumulation_steps
            if writer is not None:
                acc = (chosen > rejected).float().mean().item()
                margin = (chosen - rejected).mean().item()
                writer.add_scalar('train/loss', loss_value, total_micro_steps)
                writer.add_scalar('dpo/loss', loss_value, total_micro_steps)
                writer.add_scalar('train/acc', acc, total_micro_steps)
                writer.add_scalar('train/reward_margin', margin,
                                  total_micro_steps)
                writer.add_scalar('train/chosen_reward',
                                  chosen.mean().item(), total_micro_steps)
                writer.add_scalar('train/rejected_reward',
                                  rejected.mean().item(), total_micro_steps)
                writer.add_scalar('train/step_time_s', step_times[-1],
                                  total_micro_steps)
            if args.print_interval and total_micro_steps % args.print_interval == 0:
                recent = step_times[-args.print_interval:]
                print_rank_0(
                    f"epoch {epoch+1} step {step+1}/{len(train_dataloader)} loss {loss_value:.4f} "
                    f"batch acc {(chosen > rejected).float().mean().item():.2f} "
                    f"margin {(chosen - rejected).mean().item():.4f} "
                    f"({sum(recent)/len(recent):.3f} s/step)", args.global_rank)
            if args.eval_interval and gas_boundary and (
                    total_steps % args.eval_interval == 0):
                metrics = evaluation(model, ref_model, eval_dataloader,
                                     args.eval_iters)
                log_eval(total_micro_steps, metrics, f"step {total_steps}")
                evaluated_at = total_steps
            if args.max_steps and gas_boundary and total_steps >= args.max_steps:
                break

        print_rank_0(
            f"Epoch {epoch+1}/{args.num_train_epochs} with loss {mean_loss/max(step+1, 1)}",
            args.global_rank)
        # Evaluate rewards on the validation set.
        if evaluated_at != total_steps:
            print_rank_0(
                f"***** Evaluating rewards, Epoch {epoch+1}/{args.num_train_epochs} *****",
                args.global_rank)
            metrics = evaluation(model, ref_model, eval_dataloader,
                                 args.eval_iters)
            log_eval(total_micro_steps, metrics, f"epoch {epoch+1}")
            evaluated_at = total_steps
        model.tput_timer.update_epoch_count()
        if args.max_steps and total_steps >= args.max_steps:
            print_rank_0(f"Stopping after --max_steps {args.max_steps}",
                         args.global_rank)
            break

    steady = step_times[1:] or step_times
    if step_times:
        # The first step includes one-off warm-up (allocations, kernel selection); report it apart.
        print_rank_0(
            f"step time: {sum(steady)/len(steady):.4f} s/step over {len(steady)} steps "
            f"(first step {step_times[0]:.3f} s)", args.global_rank)

    if args.output_dir is not None:
        print_rank_0('saving the final model ...', args.global_rank)
        model = convert_lora_to_linear_layer(model)

        if args.global_rank == 0:
            save_hf_format(model, tokenizer, args)

        if args.zero_stage == 3:
            # For zero stage 3, each gpu only has a part of the model, so we need a special save function
            save_zero_three_model(model,
                                  args.global_rank,
                                  args.output_dir,
                                  zero_stage=args.zero_stage)
        if args.global_rank <= 0:
            results = {
                "before": before,
                "after": metrics,
                "eval/acc": metrics["acc"],
                "eval/reward_margin": metrics["reward_margin"],
                "train/steps": total_micro_steps,
                "train/mean_step_time_s":
                (sum(steady) / len(steady)) if steady else None,
                "train/first_step_time_s":
                step_times[0] if step_times else None,
                "beta": args.beta,
                "end_of_conversation_token": args.end_of_conversation_token,
            }
            with open(os.path.join(args.output_dir, "eval_results.json"),
                      "w") as f:
                json.dump(results, f, indent=2)
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
