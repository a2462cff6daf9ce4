"""A Hugging Face causal LM as per-token log-probs, loaded and sharded with FSDP2: what train.py trains and
score.py scores with.

    PolicyLogps       model(input_ids, attention_mask, labels) -> (log pi(y_t | x, y_<t) (B, T), response mask)
    choose_logp_path  "chunked" (hidden @ W.T block by block, never the (B, T, V) logits) or "logits"
    load_model        one process: the model itself; more ranks: FSDP2 on every decoder layer, then the root, loaded
                      with one full copy of the weights per job; fp32 master weights, bf16 compute on GPU
    sample            K responses per prompt with a KV cache, each sample's draws its own (onpolicy.py, studies)
"""

import functools
import hashlib
import inspect
import json
import math
import os
import shutil

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import data
import losses
import rundir
from utils import UserError, log0, on_rank_zero, reason


class PolicyLogps(torch.nn.Module):
    """Wraps a causal LM so that its forward returns per-token log-probs (B, T) and the response mask.

    A module rather than a function so that FSDP2's root unit covers the output embedding: the vocabulary
    projection then happens inside forward, where the weight is unsharded, and the full (B, T, V) logits never
    need to exist (chunked path). The logits path lets the model compute logits (for heads with a bias,
    soft-capping or a logit scale), only from the first response position on.
    """

    def __init__(self, model, path, chunk_size, autocast=None, together=True, fp32_head=False):
        super().__init__()
        self.model, self.path, self.chunk_size, self.autocast = model, path, chunk_size, autocast
        self.checked = path != "chunked"
        self.together = together  # the ranks run their first forward in step (FSDP): decide the check together
        # fp32_head (scoring, no gradient): the chunked path's products in float32 on a float32 copy of the head, kept
        # out of the state dict; a bf16 logit is off by up to 0.06 at 30, more than SePO's per-token scores differ
        weight = model.get_output_embeddings().weight
        self.head32 = weight.detach().float() if fp32_head and path == "chunked" and weight.dtype != torch.float32 \
            else None

    @torch.no_grad()
    def as_reference(self, **inputs):
        """A LoRA run's reference: this very model with its adapters disabled (peft), no second copy in memory."""
        with self.peft.disable_adapter():
            return self(**inputs)

    def forward(self, input_ids, attention_mask, labels):
        """-> (per-token log-probs (B, T) float32, response mask (B, T)); with `autocast` (a dtype: one process
        computing in bf16 on its fp32 weights) under torch.autocast."""
        if self.autocast is None:
            return self.log_probs(input_ids, attention_mask, labels)
        with torch.autocast(input_ids.device.type, dtype=self.autocast):
            return self.log_probs(input_ids, attention_mask, labels)

    def log_probs(self, input_ids, attention_mask, labels):
        if self.path == "logits":
            return self.logits_path(input_ids, attention_mask, labels)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
        low_precision = self.autocast is not None or hidden.dtype != torch.float32  # (the model's own logits are)
        if self.head32 is not None:
            hidden, weight = hidden.float(), self.head32
        else:
            weight = self.model.get_output_embeddings().weight
        logps, mask = losses.chunked_token_logps(hidden, weight, labels, self.chunk_size)
        if not self.checked:
            self.check_head(input_ids[:1], attention_mask[:1], labels[:1], low_precision=low_precision)
        return logps, mask

    @torch.no_grad()
    def check_head(self, input_ids, attention_mask, labels, low_precision):
        """Once: the model's own logits must give the chunked path's log-probs (a head may scale or cap them in its
        forward, in a way no config attribute names). Like is compared with like: both paths on the same row, in
        the same precision, with a tolerance that fits it (bf16 rounds a logit of 30 by 0.06; the transforms this
        finds move log-probs by nats); and under FSDP the ranks decide together, so that no rank stops alone."""
        expected, _ = self.logits_path(input_ids, attention_mask, labels)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]
        ours, _ = losses.chunked_token_logps(hidden, self.model.get_output_embeddings().weight, labels,
                                             self.chunk_size)
        gap = (expected - ours).abs().max().float().reshape(1)
        if self.together and dist.is_initialized():
            dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if float(gap) > (0.25 if low_precision else 1e-3):
            raise UserError(f"{type(self.model).__name__}: log-probs from hidden @ W.T differ from the model's own "
                            f"logits by {float(gap):.3g} (its head transforms the logits); use --logp_path logits")
        self.checked = True

    def logits_path(self, input_ids, attention_mask, labels):
        """The model's logits from the first response position on (logits_to_keep), reduced by token_logps."""
        has = (labels != losses.IGNORE_INDEX)
        starts = has.float().argmax(-1)[has.any(-1)]  # first labelled position of each row that has one
        first = max(1, int(starts.min())) if starts.numel() else 1
        keep = labels.shape[1] - first + 1  # logits from position first-1, which predicts the first response token
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        logps, mask = losses.token_logps(logits, labels[:, -keep:], chunk_size=self.chunk_size)
        pad = labels.shape[1] - keep
        return torch.nn.functional.pad(logps, (pad, 0)), torch.nn.functional.pad(mask, (pad, 0))


# Config attributes by which a head transforms hidden @ W.T (Gemma-2 soft-capping, Cohere's logit_scale, Granite's
# logits_scaling, Falcon-H1's lm_head_multiplier). Others are caught by PolicyLogps' first-call check.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                    "lm_head_multiplier": 1.0}


def choose_logp_path(requested, model):
    """chunked when logits are exactly hidden @ W.T; else the model's own logits."""
    head = model.get_output_embeddings()
    plain = (isinstance(head, torch.nn.Linear) and head.bias is None
             and all(getattr(model.config, k, neutral) in (None, neutral) for k, neutral in LOGIT_TRANSFORMS.items()))
    if requested == "chunked" and not plain:
        raise UserError(f"--logp_path chunked: {type(model).__name__}'s logits are not hidden @ W.T "
                         "(a bias, soft-capping or a logit scale); use --logp_path logits")
    return requested if requested != "auto" else ("chunked" if plain else "logits")


def make_mesh(cfg, world, device):
    if not cfg.hybrid_shard:
        return init_device_mesh(device.type, (world,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % per_node:
        raise UserError(f"--hybrid_shard: world size {world} is not a multiple of {per_node} ranks per node")
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def check_source(path, flag):
    """A model or tokenizer source must be a folder that exists or a name on the Hugging Face hub: a path that names
    no folder gets "no such folder", not the hub's complaint about repository names."""
    if not path or os.path.isdir(path):
        return
    if os.path.exists(path):
        raise UserError(f"{flag} {path}: a file, not a model folder")
    if path.startswith((".", "/", "~")) or path.count("/") > 1 or path.endswith("/") or "\\" in path:
        raise UserError(f"{flag} {path}: no such folder")
    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{flag} {path}: no such folder, and no model of that name could be loaded from the Hugging "
                        f"Face hub ({reason(e)})") from None


def set_numerics(deterministic, tf32, device):
    """--deterministic: torch's deterministic algorithms (cuBLAS's fixed workspace is set before CUDA starts, in
    utils.init_distributed), without the NaN fill of uninitialized memory (nothing here reads memory before writing
    it, and the fill would touch every FSDP all-gather buffer); --tf32: float32 matmuls on a GPU in TensorFloat-32."""
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32


def compute_dtype(flag, device):
    """--dtype: "bf16", "fp32", or "auto" (bf16 on GPU, fp32 on CPU). bf16 asked for on a CPU that does not compute
    it natively gets a warning, once per process: there it is emulated, many times slower than fp32."""
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        flag, torch.bfloat16 if device.type == "cuda" else torch.float32)
    if dtype == torch.bfloat16 and device.type == "cpu":
        warn_if_bf16_emulated()
    return dtype


@functools.cache  # once per process
def warn_if_bf16_emulated():
    if cpu_has_bf16() is False:
        log0("warning: --dtype bf16 on a CPU without native bf16 (no avx512_bf16, amx_bf16 or Arm bf16 among the "
             "flags of /proc/cpuinfo): it is emulated there, many times slower than fp32 (a forward and backward "
             "of SmolLM2-135M, 15x on an AVX2 CPU); --dtype fp32 is faster")


def cpu_has_bf16(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU computes bf16 natively (x86 avx512_bf16 or amx_bf16; Arm bf16), from the flags in cpuinfo;
    None where that file cannot be read (not Linux)."""
    try:
        with open(cpuinfo) as fh:
            lines = [line.split(":", 1)[1] for line in fh if line.startswith(("flags", "Features")) and ":" in line]
    except OSError:
        return None
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & {f for line in lines for f in line.split()})


def load_model(path, cfg, mesh, device, trainable):
    """A causal LM as PolicyLogps, fp32 master weights.

    One process: the model itself, on the device (FSDP would only add copies of each layer's weights and
    gradients; measured in the README); bf16 compute on a GPU under autocast. More ranks: FSDP2 on each decoder
    layer, then the root (embeddings, final norm, output embedding), bf16 compute on GPU with fp32 gradient
    reduction; and one full copy of the weights per job at load: rank 0 reads the checkpoint, the other ranks
    build the model on the meta device, and every rank keeps its shards of what rank 0 broadcasts (with the
    buffers that no checkpoint holds, such as rotary frequencies). The weights are those of from_pretrained, bit
    for bit.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    world, rank = mesh.size(), dist.get_rank()
    config = AutoConfig.from_pretrained(path)
    dtype = compute_dtype(cfg.dtype, device)
    # a frozen reference sharded on GPUs is kept in bf16: FSDP computes in bf16 from its shards anyway (the policy's
    # too), so it is the same model at half the memory. Not in a world of one, whose policy computes under an autocast
    # over fp32 weights (its norms and residual stream in fp32): the reference must do the same to equal it at step 0
    store = torch.bfloat16 if not trainable and dtype == torch.bfloat16 and device.type == "cuda" and world > 1 \
        else torch.float32
    attention = {"attn_implementation": getattr(cfg, "attn_implementation", "sdpa")}

    def read():  # rank 0 (or a world of one) reads the weights; a file that cannot be read stops every rank
        try:
            return AutoModelForCausalLM.from_pretrained(path, dtype=store, **attention)
        except ValueError as e:
            if "Unrecognized configuration class" in str(e):
                raise UserError(f"{path}: {type(config).__name__} has no causal-LM head that AutoModelForCausalLM "
                                f"can load ({e})") from None
            raise UserError(f"{path}: the model could not be loaded ({reason(e)})") from None
        except Exception as e:  # a damaged model.safetensors (SafetensorError), a weight of the wrong shape, ...
            raise UserError(f"{path}: the model could not be loaded ({reason(e)}); is a weight file damaged or "
                            "cut short?") from None
    lora = trainable and getattr(cfg, "lora_r", 0) > 0
    source = on_rank_zero(lambda: add_lora(read(), cfg).get_base_model() if lora else read(), share=False)
    with torch.device("meta"):
        model = source if world == 1 else AutoModelForCausalLM.from_config(config, dtype=store, **attention)
    peft = (add_lora(model, cfg) if world > 1 else source.peft) if lora else None  # (the same modules, with adapters)
    if cfg.activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.disable_dropout:  # as TRL: dropout would make the log-probs (and ConfPO's threshold) noisy
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    wrapped = PolicyLogps(model, choose_logp_path(cfg.logp_path, model), cfg.chunk_size,
                          autocast=dtype if world == 1 and dtype != torch.float32 else None)
    object.__setattr__(wrapped, "peft", peft)  # not a submodule: FSDP shards the model once
    if world == 1:
        wrapped.to(device)
    else:
        shard(wrapped, mesh, MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32), trainable, path)
        wrapped.to_empty(device=device)
        full = source.state_dict() if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        own = dict(source.named_buffers()) if rank == 0 else {}
        for name, buffer in model.named_buffers():  # buffers outside the state dict are not broadcast above
            if rank == 0:
                buffer.copy_(own[name])
            dist.broadcast(buffer, src=0)
        del full, own
        if rank == 0:
            del source
    wrapped.train(trainable)
    if not trainable:
        wrapped.requires_grad_(False)
    return wrapped


def load_for_inference(path, dtype, device, attn_implementation="sdpa", flag="--model", kind=None):
    """A Hugging Face model for inference on one device (no FSDP: ranks split the data), in eval mode, with no KV
    cache unless one is asked for (a checkpoint's use_cache would build one every forward of a scorer); a model that
    cannot load is one UserError naming the flag. kind: the Auto class (AutoModelForCausalLM by default)."""
    from transformers import AutoModelForCausalLM
    try:
        model = (kind or AutoModelForCausalLM).from_pretrained(path, dtype=dtype,
                                                               attn_implementation=attn_implementation)
    except Exception as e:
        raise UserError(f"{flag} {path}: could not be loaded ({reason(e)})") from None
    model.config.use_cache = False
    return model.to(device).eval()


def memory_estimate(config, cfg, world, reference, device):
    """A line estimating the peak memory per rank of the first long step, before it runs: the sharded state (fp32
    weights, gradients and AdamW's two moments: 16 bytes a parameter; a frozen reference: 2 sharded on GPUs in
    bf16, 4 else), and the saved activations of one micro-batch at --max_length (about 34 h bytes a token per layer
    in 16 bits with a memory-efficient attention, Korthikanti et al. 2022; with activation checkpointing, 2 h per layer
    kept plus one layer's 34 h). An estimate to plan with, not a measurement (bench.py and the GPU check measure)."""
    h, layers, gib = config.hidden_size, config.num_hidden_layers, 2**30
    half = device.type == "cuda" and cfg.dtype != "fp32"  # 16-bit activations; a sharded reference too
    state = _parameter_count(config) * (16 + (2 if half and world > 1 else 4) * reference) / world
    tokens = 2 * cfg.micro_batch_size * cfg.max_length  # chosen and rejected rows
    per_layer = 34 * h * tokens * (1 if half else 2)
    activations = (2 * h * tokens * layers * (1 if half else 2) + per_layer) if cfg.activation_checkpointing else \
        per_layer * layers
    return (f"memory per rank, estimated for a micro-batch of {cfg.micro_batch_size} pairs at {cfg.max_length} "
            f"tokens: {(state + activations) / gib:.1f} GiB ({state / gib:.1f} GiB of sharded state, "
            f"{activations / gib:.1f} GiB of activations {'with' if cfg.activation_checkpointing else 'without'} "
            "activation checkpointing)")


def _parameter_count(config):
    """A decoder's parameters from its config: embeddings (twice unless tied), attention and MLP per layer."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    inner = getattr(config, "intermediate_size", 4 * h)
    attention = 2 * h * h + 2 * h * (h // heads) * kv
    mlp = 3 * h * inner
    return v * h * (1 if getattr(config, "tie_word_embeddings", False) else 2) + layers * (attention + mlp + 2 * h)


def lora_config(cfg):
    """peft's LoraConfig from --lora_r, --lora_alpha, --lora_dropout, --lora_target_modules."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise UserError("--lora_r needs the peft package: pip install peft") from None
    targets = cfg.lora_target_modules
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets if targets == "all-linear" else targets.split(","), task_type="CAUSAL_LM")


def add_lora(model, cfg):
    """LoRA adapters on a causal LM, injected in place (the model's own modules then compute with them; its other
    weights are frozen) -> the PeftModel, also kept as model.peft. The adapters' initial values are drawn from
    torch's generator (set_up seeds it), on rank 0, and broadcast with the weights."""
    from peft import get_peft_model
    peft = get_peft_model(model, lora_config(cfg))
    object.__setattr__(model, "peft", peft)
    return peft


def shard(wrapped, mesh, mp, trainable, path):
    """FSDP2: each decoder layer, then the root."""
    layer_classes = set(getattr(wrapped.model, "_no_split_modules", None) or [])
    layers = [m for m in wrapped.model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise UserError(f"{path}: cannot find the decoder layers of {type(wrapped.model).__name__} to shard")
    for i, layer in enumerate(layers):
        # a trained model needs its last layer again right at the start of backward: keep it gathered; a frozen
        # reference never runs backward, so everything (its root included) is resharded after forward
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable or i < len(layers) - 1)
    fully_shard(wrapped, mesh=mesh, mp_policy=mp, **({} if trainable else {"reshard_after_forward": True}))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: SePO's requirement (the oracle selects positions of the policy's tokens), and the way around it
# ---------------------------------------------------------------------------------------------------------------

def tokenizer_differences(a, b):
    """What differs between two tokenizers in ways that change token ids: vocabulary and special tokens."""
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diffs.append(f"vocabulary ({len(va)} vs {len(vb)} tokens, {len(va.keys() ^ vb.keys())} differ)")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(a, name, None) != getattr(b, name, None):
            diffs.append(f"{name} ({getattr(a, name, None)!r} vs {getattr(b, name, None)!r})")
    return diffs


def check_tokenizers(oracle_tok, policy_tok, oracle, policy, cross_tokenizer):
    """Stop when the oracle cannot select positions of the policy's tokens (the paper's limitation) unless
    cross_tokenizer; warn when only the chat templates differ (the oracle would read a format it was not trained
    on). Returns True when the vocabularies differ (and cross_tokenizer allows it)."""
    diffs = tokenizer_differences(oracle_tok, policy_tok)
    if diffs and not cross_tokenizer:
        raise UserError(f"the oracle ({oracle}) and the policy ({policy}) have different tokenizers: "
                         f"{'; '.join(diffs)}. SePO selects token positions, so they must match (the paper's "
                         "stated limitation); pass --cross_tokenizer to map selections through character offsets")
    if not diffs and getattr(oracle_tok, "chat_template", None) != getattr(policy_tok, "chat_template", None):
        log0(f"warning: {oracle} and {policy} share a vocabulary but not a chat template; the oracle scores the "
             "data rendered with the policy's template (train the oracle with --tokenizer set to the policy, as "
             "sepo_pipeline.py does)")
    return bool(diffs)


def map_across_tokenizers(src_spans, src_selected, src_scores, dst_spans, align_tail=True):
    """Carry a selection from one tokenization of a response to another through character spans.

    src_spans (n, 2), dst_spans (m, 2): [start, end) in the response text per token, [-1, -1] for tokens outside
    it (template tokens, EOS). A destination token is selected when it overlaps a selected source token's span; its
    score is the overlap-weighted mean of the source scores it overlaps. align_tail (both responses end with their
    EOS, not cut by truncation): the trailing span-less tokens (an end-of-turn token, the EOS) are paired from the
    end. Returns (selected (m,) bool, scores (m,) float, covered (m,) bool: tokens with text that some source token
    overlaps).
    """
    a_s, b_s = src_spans[:, 0].double(), src_spans[:, 1].double()
    a_d, b_d = dst_spans[:, 0].double(), dst_spans[:, 1].double()
    # overlap[j, i] = characters shared by destination token j and source token i
    overlap = (torch.minimum(b_d[:, None], b_s[None]) - torch.maximum(a_d[:, None], a_s[None])).clamp(min=0)
    overlap[dst_spans[:, 0] < 0] = 0
    overlap[:, src_spans[:, 0] < 0] = 0
    selected = (overlap * src_selected[None].double()).sum(1) > 0
    weight = overlap.sum(1)
    scores = (overlap @ src_scores.double()) / weight.clamp(min=1)
    if align_tail:
        j, i = len(dst_spans) - 1, len(src_spans) - 1
        while j >= 0 and i >= 0 and dst_spans[j, 0] < 0 and src_spans[i, 0] < 0:
            selected[j], scores[j] = src_selected[i], src_scores[i]
            j, i = j - 1, i - 1
    return selected, scores.float(), (weight > 0) | (dst_spans[:, 0] < 0)


# ---------------------------------------------------------------------------------------------------------------
# To and from Hugging Face folders: the export of a run, the weights of a checkpoint for evaluation
# ---------------------------------------------------------------------------------------------------------------

def export(out_dir, model, tokenizer, model_path, step, rank, dtype="auto", lora=None):
    """A Hugging Face folder (safetensors + config + tokenizer) at out_dir/final, with run.json naming the step it
    holds; `model` the (possibly FSDP-sharded) Hugging Face module; dtype: "auto" (the source checkpoint's: bf16
    stays bf16), "bf16" or "fp32". Parameters are gathered one at a time to rank 0's CPU memory; the other ranks
    never hold the whole model. Written to final.tmp and renamed. With `lora` (peft's LoraConfig of the run): the
    adapters merged into a plain model that AutoModelForCausalLM loads, and the adapter alone in final/adapter."""
    from transformers import AutoConfig, AutoModelForCausalLM
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        config = AutoConfig.from_pretrained(model_path)
        if dtype == "auto":  # the source checkpoint's dtype
            dtype = getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        else:
            dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
            config.dtype = dtype
        out = os.path.join(out_dir, "final")
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if lora:  # the trained adapters on the base model, then merged into its weights
            from peft import get_peft_model
            peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), lora)
            peft.get_base_model().load_state_dict(sd)
            peft.save_pretrained(os.path.join(tmp, "adapter"))
            sd = peft.merge_and_unload().state_dict()
        with torch.device("meta"):
            plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
        plain.tie_weights()
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        rundir.atomic_write(os.path.join(tmp, "run.json"), json.dumps({"step": step}))
        if os.path.exists(out):  # a final/ without its config.json (train.py exports when that is missing)
            rundir.remove(out)
        os.replace(tmp, out)
        rundir.fsync_dir(out_dir)
        log0(f"exported {out}")
    dist.barrier()


def load_weights(model, path):
    """The weights of a checkpoint (DCP shards, keys `model.<Hugging Face key>`) or of an exported folder into a
    plain Hugging Face model -> the model, in eval mode (evaluations of checkpoints along a run)."""
    import torch.distributed.checkpoint as dcp
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        sd = {f"model.{k}": v for k, v in model.state_dict().items()}
        dcp.load({"model": sd}, checkpoint_id=path)
        model.load_state_dict({k[len("model."):]: v for k, v in sd.items()})
    else:
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# The reference pre-pass (train.py --precompute_ref): the frozen reference's log-probs, once, block by block
# ---------------------------------------------------------------------------------------------------------------

def reference_identity(cfg, fingerprints, split, n_pairs, tokenizer, device):
    """What a split's reference blocks hold the log-probs of (train.py's config, its paths' fingerprints): blocks of
    anything else are cleared."""
    held_out = split == "eval"
    return {"reference": fingerprints["ref_model"] or fingerprints["model"], "pairs": n_pairs,
            "data": held_out and fingerprints["eval_data"] or fingerprints["data"],
            "split": held_out and cfg.eval_split or cfg.split, "tokenizer": data.tokenizer_hash(tokenizer),
            "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "form": cfg.form,
            "skip_bad_rows": cfg.skip_bad_rows, "attention": cfg.attn_implementation,
            "dtype": repr(compute_dtype(cfg.dtype, device))}


def reference_logps(ref, n_pairs, batch_of, folder, split, identity, micro_batch_size, rank, world, block=256):
    """The reference's per-token log-probs of every pair -> {pair index: (chosen (n_w,), rejected (n_l,))}, over
    its response tokens, computed once: block by block (rundir.Blocks in folder, <split>_NNNNNN.pt, tensors only),
    every rank forwarding its share of a block's pairs through the sharded reference, rank 0 writing the block. A
    killed pass resumes at the first missing block; a damaged block (cut short, of other pairs) is computed again;
    blocks of anything else than `identity` are cleared first. Every rank forwards as many micro-batches as the
    others, an empty share of the last block included (FSDP's collectives must match). batch_of(indices): the
    collated batch of those pairs."""
    members = lambda b: list(range(b * block, min(n_pairs, (b + 1) * block)))  # noqa: E731

    def read(path, b):  # tensors only: loading runs no code
        try:
            saved = torch.load(path, weights_only=True)
            ok = saved["index"].tolist() == members(b) and len(saved["chosen"]) == len(saved["rejected"]) == \
                len(members(b))
            return saved if ok else None
        except Exception:  # cut short, garbage, another format: any error of the reader
            return None
    store = rundir.Blocks(folder, math.ceil(n_pairs / block), read, prefix=f"{split}_", ext=".pt", identity=identity)
    todo = store.missing()
    from tqdm import tqdm
    for b in tqdm(todo, desc=f"reference log-probs ({split})", disable=rank != 0 or not todo, dynamic_ncols=True):
        idx = members(b)
        mine = idx[rank::world]
        # every rank the same forwards (FSDP): a short share repeats a pair, an empty one forwards the block's first
        work = ((mine or idx[:1]) * math.ceil(len(idx) / world))[:math.ceil(len(idx) / world)]
        rows = {}
        for s in range(0, len(work), micro_batch_size):
            chunk = work[s:s + micro_batch_size]
            batch = batch_of(chunk)
            with torch.no_grad():
                logps, mask = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"])
            for j, i in enumerate(chunk):  # per pair of this rank's share: its response tokens' log-probs
                if i in mine:
                    rows[i] = (logps[j][mask[j]].cpu(), logps[len(chunk) + j][mask[len(chunk) + j]].cpu())
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            rows = {i: r for part in gathered for i, r in part.items()}
            store.save(b, {"index": torch.tensor(idx), "chosen": [rows[i][0] for i in idx],
                           "rejected": [rows[i][1] for i in idx]})
        dist.barrier()
    values = {}
    for b in range(store.n_blocks):
        saved = store.load(b)
        values.update(zip(saved["index"].tolist(), zip(saved["chosen"], saved["rejected"])))
    return values


# ---------------------------------------------------------------------------------------------------------------
# Sampling (onpolicy.py, the studies): one prefill per prompt shared by its K samples, a KV cache, finished rows
# leave the batch
# ---------------------------------------------------------------------------------------------------------------

def draw_seed(seed, row, k):
    """The seed of sample k of source row `row`: the same draws whatever the batch, block or rank."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{row}:{k}".encode()).digest()[:8], "little") >> 1


def nucleus_pick(logits, u, temperature, top_p):
    """One token per row (A, V) -> (A,): the argmax when temperature is 0; else the token where u (A,) in [0, 1)
    falls in the cumulative distribution of softmax(logits / temperature) cut to its nucleus (the most likely
    tokens, in order, until their mass reaches top_p; at least one) and renormalised. The nucleus is sought among
    the top 64, then 1024 tokens, and the whole vocabulary only for the rows that need it (a full sort costs 40
    times a top-64 on a 49k vocabulary). With top_p = 1 there is no nucleus to find: the CDF is taken in vocabulary
    order."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p >= 1:  # the whole distribution: its CDF in vocabulary order, no sort (an exact sample all the same)
        cdf = logits.softmax(-1).cumsum(-1)
        return torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp(max=logits.shape[1] - 1).squeeze(-1)
    log_z = logits.logsumexp(-1, keepdim=True)
    out = torch.empty(len(logits), dtype=torch.long, device=logits.device)
    todo = torch.arange(len(logits), device=logits.device)
    V = logits.shape[1]
    for c in (min(64, V), min(1024, V), V):
        p, idx = (logits[todo] - log_z[todo]).exp().topk(c, -1)  # sorted, most likely first
        before = p.cumsum(-1) - p  # the mass of the tokens ranked above each one
        found = (before[:, -1] + p[:, -1] >= top_p) | (c == V)
        p = p * (before < top_p)  # the nucleus
        cdf = p.cumsum(-1)
        j = torch.searchsorted(cdf, (u[todo] * cdf[:, -1]).unsqueeze(-1)).clamp(max=c - 1)
        out[todo[found]] = idx.gather(-1, j).squeeze(-1)[found]
        todo = todo[~found]
        if not len(todo):
            break
    return out


@torch.no_grad()
def sample(model, prompt_ids, seeds, max_new_tokens, temperature=1.0, top_p=1.0, eos_ids=(), pad_id=0):
    """Responses of a causal LM to a batch of prompts -> per prompt, per sample: (token ids, ended with an EOS).

    prompt_ids: P lists of token ids; seeds: per prompt, the draw seeds of its K samples (draw_seed). Each prompt
    is read once (left-padded prefill) and its KV cache repeated for its K samples; rows leave the batch, and the
    cache, when they emit an EOS (any of eos_ids); a row's t-th token uses the t-th uniform of its own generator,
    drawn on the CPU, so a sample does not depend on the device, the batch or the other rows. The token ids
    include the EOS."""
    from transformers import DynamicCache
    device = next(model.parameters()).device
    P, K = len(prompt_ids), len(seeds[0])
    L = max(len(x) for x in prompt_ids)
    ids = torch.tensor([[pad_id] * (L - len(x)) + list(x) for x in prompt_ids], device=device)  # (P, L)
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in prompt_ids], device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    accepted = inspect.signature(model.forward).parameters
    cache = DynamicCache(config=model.config)
    given = {"cache" if "cache" in accepted else "past_key_values": cache, "use_cache": True}  # transformers 5.x: cache
    last = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **given, **last).logits[:, -1]
    cache.batch_repeat_interleave(K)  # row p * K + k is sample k of prompt p
    logits, mask = logits.repeat_interleave(K, 0), mask.repeat_interleave(K, 0)
    position = positions[:, -1].repeat_interleave(K, 0)
    u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s)) for row in seeds
                     for s in row]).to(device)  # (P K, max_new_tokens)
    eos = torch.tensor(sorted(set(eos_ids)), device=device)
    tokens = torch.full((P * K, max_new_tokens), pad_id, device=device)
    length = torch.zeros(P * K, dtype=torch.long, device=device)
    ended = torch.zeros(P * K, dtype=torch.bool, device=device)
    mask = torch.cat([mask, mask.new_ones(P * K, max_new_tokens)], 1)  # every step's mask, made once: (P K, L + new)
    live = torch.arange(P * K, device=device)  # the rows still generating
    for t in range(max_new_tokens):
        y = nucleus_pick(logits, u[live, t], temperature, top_p)
        tokens[live, t] = y
        length[live] += 1
        stop = torch.isin(y, eos)
        ended[live[stop]] = True
        stopped = int(stop.sum())  # the one wait for the device per token
        if t == max_new_tokens - 1 or stopped == len(live):
            break
        if stopped:  # finished rows leave the batch and the cache
            keep = (~stop).nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            live, position, y = live[keep], position[keep], y[keep]
        position = position + 1
        logits = model(input_ids=y[:, None], attention_mask=mask[live, :L + t + 1], position_ids=position[:, None],
                       **given).logits[:, -1]
    tokens, length, ended = tokens.cpu(), length.tolist(), ended.tolist()
    return [[(tokens[p * K + k, :length[p * K + k]].tolist(), ended[p * K + k]) for k in range(K)] for p in range(P)]


def eos_token_ids(model, tokenizer):
    """Every id that ends a response: the tokenizer's EOS and the generation config's (Llama-3: two of them)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return sorted(i for i in ids if i is not None)
