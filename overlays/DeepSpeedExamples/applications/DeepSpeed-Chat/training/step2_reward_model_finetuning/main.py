#!/usr/bin/env python
# rlhf-overlay: REPLACES applications/DeepSpeed-Chat/training/step2_reward_model_finetuning/main.py at the pin
# (83757d9c). Based on that file; changes (the seed's rm_main.py rebuilt for the dschat/ layout, plus CPU fixes):
#   - RANK_REPORT=1 (rlhf_overlay.runtime.rank_report): each rank records the samples it trained on and its optimizer
#     state size, to check data splitting and ZeRO partitioning with several ranks;
#   - tensorboard scalars in the output folder at every eval: train/loss, eval/reward_score, eval/acc (+ the
#     project's common names rm/loss, rm/acc) and a final eval_results.json;
#   - default --data_split 6,2,2; end-of-conversation token = the tokenizer's EOS (LLaMA2 has no <|endoftext|>);
#   - --dtype fp32 (the default on CPU); ZeRO-3 / fp16 refused on CPU with a clear message;
#   - a local model folder is checked to exist; --num_padding_at_beginning defaults from the model (OPT 1, else 0);
#   - BLOOM: the reward model's transformer is `rwtransformer` (upstream misspelled it `rwtranrsformer`);
#   - progress lines (loss, seconds per step) in the terminal; no crash on an empty eval set;
#   - --max_steps stops after that many optimizer steps (then evaluates and saves as at the end of training).
# Copyright (c) Microsoft Corporation.
# SPDX-License-Identifier: Apache-2.0

# DeepSpeed Team
import argparse
import json
import math
import os
import time

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from transformers import (
    SchedulerType,
    get_scheduler,
)

import deepspeed
from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam
from deepspeed.accelerator import get_accelerator

from dschat.utils.model.model_utils import create_critic_model
from dschat.utils.data.data_utils import create_prompt_dataset, DataCollatorReward
from dschat.utils.utils import print_rank_0, to_device, save_hf_format, set_random_seed, get_all_reduce_mean, get_optimizer_grouped_parameters, save_zero_three_model, load_hf_tokenizer
from dschat.utils.ds_utils import get_train_ds_config
from dschat.utils.module.lora import convert_linear_layer_to_lora, convert_lora_to_linear_layer, only_optimize_lora_parameters, make_model_gradient_checkpointing_compatible
from dschat.utils import run_checks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=
        "(Step 2) Train a reward model on preference pairs (prompt, chosen, rejected)")
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
                        default='6,2,2',
                        help='Comma-separated list of proportions for training '
                        'phase 1, 2, and 3 data. For example the split `6,2,2` '
                        'will use 60%% of data for phase 1, 20%% for phase 2 '
                        'and 20%% for phase 3 (this step uses the phase-2 share).')
    parser.add_argument(
        '--data_output_path',
        type=str,
        default='/tmp/data_files/',
        help='Where to store the data-related files such as shuffle index.')
    parser.add_argument(
        "--model_name_or_path",
        type=str,
        help=
        "Path to pretrained model or model identifier from huggingface.co/models.",
        required=True,
    )
    parser.add_argument(
        "--num_padding_at_beginning",
        type=int,
        default=None,
        help=
        "OPT model has a fixed number (1) of padding tokens at the beginning of the input; "
        "LLaMA, BLOOM, GPT-J have none (0). Default: 1 for OPT, 0 otherwise (from the model's config).",
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
        default=5e-5,
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
    parser.add_argument(
        '--gradient_checkpointing',
        action='store_true',
        help='Enable HF gradient checkpointing for Actor model.')
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
                        help="The scope of LoRA.")
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
    parser.add_argument("--eval_interval",
                        type=int,
                        default=0,
                        help="If > 0, perform evaluation at this interval")
    parser.add_argument("--eval_iters",
                        type=int,
                        default=100,
                        help="Maximum evaluation iterations")
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
        help="Print loss and seconds per step every this many steps (0: never)")
    ## low precision
    parser.add_argument(
        '--compute_fp32_loss',
        action='store_true',
        help='Relevant for low precision dtypes (fp16, bf16, etc.). '
        'If specified, loss is calculated in fp32.')

    ## Tensorboard logging
    parser.add_argument(
        '--enable_tensorboard',
        action='store_true',
        help='Also enable DeepSpeed\'s own tensorboard monitor (our scalars '
        'train/loss, eval/reward_score, eval/acc are always written)')
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
        "EOS token (</s> for LLaMA2). Upstream used <|endoftext|>.")
    parser.add_argument(
        "--add_eot_token",
        action='store_true',
        help="Add the end-of-conversation token as an additional special token "
        "to the tokenizer (only useful with a custom --end_of_conversation_token)")
    parser = deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)

    # Validate settings (before any model is loaded).
    run_checks.check_model_path(args.model_name_or_path,
                                "--model_name_or_path")
    args.dtype = run_checks.resolve_dtype(args.dtype)
    run_checks.check_cpu_limits(args.dtype,
                                {"--zero_stage": args.zero_stage})
    if args.num_padding_at_beginning is None:
        args.num_padding_at_beginning = run_checks.default_num_padding_at_beginning(
            args.model_name_or_path)
    if args.tensorboard_path is None:
        args.tensorboard_path = os.path.join(
            args.output_dir,
            "tensorboard") if args.output_dir else "step2_tensorboard"
    return args


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
        f"dtype={args.dtype} zero_stage={args.zero_stage} num_padding_at_beginning="
        f"{args.num_padding_at_beginning} end_of_conversation_token={args.end_of_conversation_token!r}",
        args.global_rank)
    rm_model = create_critic_model(args.model_name_or_path,
                                   tokenizer,
                                   ds_config,
                                   args.num_padding_at_beginning,
                                   dropout=args.dropout,
                                   zero_stage=args.zero_stage,
                                   compute_fp32_loss=args.compute_fp32_loss)

    # Model bigscience/bloom-560m has large variance at ln_f.weight parameter
    # This makes bf16 finetuning hard.
    # In general, since we are replacing the model head, it makes sense to reset
    # the LN that precedes it.
    force_optimize_params = []
    if "bigscience/bloom-" in args.model_name_or_path:
        zero_init_enabled = (args.zero_stage == 3)
        params = [
            rm_model.rwtransformer.ln_f.weight,
            rm_model.rwtransformer.ln_f.bias
        ]
        with deepspeed.zero.GatheredParameters(params,
                                               modifier_rank=0,
                                               enabled=zero_init_enabled):
            if deepspeed.comm.get_rank() == 0 or not zero_init_enabled:
                torch.nn.init.ones_(rm_model.rwtransformer.ln_f.weight)
                torch.nn.init.zeros_(rm_model.rwtransformer.ln_f.bias)
        force_optimize_params.extend(
            ['rwtransformer.ln_f.weight', 'rwtransformer.ln_f.bias'])

    if args.lora_dim > 0:
        rm_model = convert_linear_layer_to_lora(rm_model,
                                                args.lora_module_name,
                                                args.lora_dim)
        if args.only_optimize_lora:
            force_optimize_params.append('v_head.weight')
            rm_model = only_optimize_lora_parameters(rm_model,
                                                     force_optimize_params)
            rm_model = make_model_gradient_checkpointing_compatible(rm_model)

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

    def evaluation_reward(model, dataloader, eval_iters):
        model.eval()
        correct_predictions = torch.zeros((), device=device)
        total_predictions = 0
        chosen_scores = torch.zeros((), device=device)
        rejected_scores = torch.zeros((), device=device)
        n_batches = 0
        for _step, _batch in enumerate(dataloader):
            _batch = to_device(_batch, device)
            with torch.no_grad():
                _outputs = model(**_batch)

            chosen = _outputs["chosen_mean_scores"]
            rejected = _outputs["rejected_mean_scores"]
            correct_predictions += (chosen > rejected).sum()
            total_predictions += chosen.shape[0]
            chosen_scores += _outputs["chosen_mean_scores"].mean().float()
            rejected_scores += _outputs["rejected_mean_scores"].mean().float()
            n_batches = _step + 1
            if (_step + 1) == eval_iters:
                break
        if n_batches == 0:  # upstream crashed here on an empty eval split
            print_rank_0("No evaluation rows: skipping the evaluation",
                         args.global_rank)
            return float("nan"), float("nan"), float("nan")
        _acc = correct_predictions.float() / total_predictions
        chosen_scores = chosen_scores / n_batches
        rejected_scores = rejected_scores / n_batches
        try:
            _acc = get_all_reduce_mean(_acc).item()
            chosen_scores = get_all_reduce_mean(chosen_scores).item()
            rejected_scores = get_all_reduce_mean(rejected_scores).item()
        except Exception:
            _acc = float(_acc)
            chosen_scores = float(chosen_scores)
            rejected_scores = float(rejected_scores)
        return chosen_scores, rejected_scores, _acc

    def log_eval(global_step, reward_score, reject_score, acc):
        if writer is None:
            return
        writer.add_scalar('eval/reward_score', reward_score, global_step)
        writer.add_scalar('eval/rejected_score', reject_score, global_step)
        writer.add_scalar('eval/acc', acc, global_step)
        writer.add_scalar('rm/acc', acc, global_step)
        writer.flush()

    # Split weights in two groups, one with weight decay and the other not.
    optimizer_grouped_parameters = get_optimizer_grouped_parameters(
        rm_model, args.weight_decay, args.lora_learning_rate)

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

    rm_model, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=rm_model,
        optimizer=optimizer,
        args=args,
        config=ds_config,
        lr_scheduler=lr_scheduler,
        dist_init_required=True)

    if args.gradient_checkpointing:
        rm_model.gradient_checkpointing_enable()

    # Train!
    print_rank_0("***** Running training *****", args.global_rank)

    print_rank_0(
        f"***** Evaluating reward, Epoch {0}/{args.num_train_epochs} *****",
        args.global_rank)
    reward_score, reject_score, acc = evaluation_reward(
        rm_model, eval_dataloader, args.eval_iters)
    log_eval(0, reward_score, reject_score, acc)
    print_rank_0(
        f"chosen_last_scores (higher is better) : {reward_score}, "
        f"rejected_last_scores (lower is better) : {reject_score}, "
        f"acc (higher is better) : {acc}", args.global_rank)

    total_micro_steps = 0
    total_steps = 0
    step_times = []
    from rlhf_overlay.runtime.rank_report import RankReport
    rank_report = RankReport("rm")
    for epoch in range(args.num_train_epochs):
        print_rank_0(
            f"Beginning of Epoch {epoch+1}/{args.num_train_epochs}, Total Micro Batches {len(train_dataloader)}",
            args.global_rank)
        rm_model.train()
        mean_loss = 0
        step = -1
        for step, batch in enumerate(train_dataloader):
            step_start = time.time()
            batch = to_device(batch, device)
            rank_report.add_samples(batch["input_ids"], tokenizer.pad_token_id)
            outputs = rm_model(**batch, use_cache=False)
            loss = outputs["loss"]
            rm_model.backward(loss)
            rm_model.step()
            loss_value = loss.item()
            mean_loss += loss_value
            step_times.append(time.time() - step_start)
            total_micro_steps += 1
            gas_boundary = (total_micro_steps %
                            args.gradient_accumulation_steps == 0)
            total_steps = total_micro_steps // args.gradient_accumulation_steps
            if writer is not None:
                writer.add_scalar('train/loss', loss_value, total_micro_steps)
                writer.add_scalar('rm/loss', loss_value, total_micro_steps)
                writer.add_scalar('train/step_time_s', step_times[-1],
                                  total_micro_steps)
            if args.print_interval and total_micro_steps % args.print_interval == 0:
                recent = step_times[-args.print_interval:]
                print_rank_0(
                    f"epoch {epoch+1} step {step+1}/{len(train_dataloader)} loss {loss_value:.4f} "
                    f"({sum(recent)/len(recent):.3f} s/step)", args.global_rank)
            if args.eval_interval and gas_boundary and (
                    total_steps % args.eval_interval == 0):
                print_rank_0(f"Iter {total_steps}: Evaluating reward",
                             args.global_rank)
                reward_score, reject_score, acc = evaluation_reward(
                    rm_model, eval_dataloader, args.eval_iters)
                log_eval(total_micro_steps, reward_score, reject_score, acc)
                print_rank_0(
                    f"Iter {total_steps}: c_scores: {reward_score}, r_scores: {reject_score}, "
                    f"diff: {reward_score - reject_score}, acc: {acc}",
                    args.global_rank)
                rm_model.train()
            if args.max_steps and gas_boundary and total_steps >= args.max_steps:
                break

        print_rank_0(
            f"Epoch {epoch+1}/{args.num_train_epochs} with loss {mean_loss/max(step+1, 1)}",
            args.global_rank)
        # Evaluate reward_loss on the validation set.
        print_rank_0(
            f"***** Evaluating reward, Epoch {epoch+1}/{args.num_train_epochs} *****",
            args.global_rank)
        reward_score, reject_score, acc = evaluation_reward(
            rm_model, eval_dataloader, args.eval_iters)
        log_eval(total_micro_steps, reward_score, reject_score, acc)
        print_rank_0(
            f"chosen_last_scores (higher is better) : {reward_score}, "
            f"rejected_last_scores (lower is better) : {reject_score}, "
            f"acc (higher is better) : {acc}", args.global_rank)
        rm_model.tput_timer.update_epoch_count()
        if args.max_steps and total_steps >= args.max_steps:
            print_rank_0(f"Stopping after --max_steps {args.max_steps}",
                         args.global_rank)
            break

    if step_times:
        # The first step includes one-off warm-up (allocations, kernel selection); report it apart.
        steady = step_times[1:] or step_times
        print_rank_0(
            f"step time: {sum(steady)/len(steady):.4f} s/step over {len(steady)} steps "
            f"(first step {step_times[0]:.3f} s)", args.global_rank)

    rank_report.add_optimizer("rm", rm_model)
    rank_report.write()

    if args.output_dir is not None:
        print_rank_0('saving model ...', args.global_rank)
        rm_model = convert_lora_to_linear_layer(rm_model)

        if args.global_rank == 0:
            save_hf_format(rm_model, tokenizer, args)
        if args.zero_stage == 3:
            # for zero stage 3, each gpu only has a part of the model, so we need to save the model on each gpu by using DS-Engine
            save_zero_three_model(rm_model,
                                  args.global_rank,
                                  args.output_dir,
                                  zero_stage=args.zero_stage)
        if args.global_rank <= 0:
            steady = step_times[1:] or step_times
            results = {
                "eval/acc": acc,
                "eval/reward_score": reward_score,
                "eval/rejected_score": reject_score,
                "train/steps": total_micro_steps,
                "train/mean_step_time_s":
                (sum(steady) / len(steady)) if steady else None,
                "end_of_conversation_token": args.end_of_conversation_token,
                "num_padding_at_beginning": args.num_padding_at_beginning,
            }
            with open(os.path.join(args.output_dir, "eval_results.json"),
                      "w") as f:
                json.dump(results, f, indent=2)
    if writer is not None:
        writer.close()


if __name__ == "__main__":
    main()
