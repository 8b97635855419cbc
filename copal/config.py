"""The run configuration: a YAML file validated here (unknown keys are errors)."""

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from copal.errors import InputError
from copal.masks import STRUCTURES, Structure, parse_structure
from copal.methods import METHODS
from copal.methods.copal import CopalOptions
from copal.methods.refitted import RefitOptions
from copal.methods.sparsegpt import SparseGPTOptions
from copal.model import DTYPES
from copal.names import NAME_RULE, is_safe_name
from copal.options import Strict
from copal.owl import check_options, check_structure
from copal.paths import shipped
from copal.profiles import OWLOptions
from copal.regimes import REGIMES
from copal.codecs import CODECS, HESSIAN_CODECS

# The choices a config offers are the registries' names, in their order (which is also
# the order pydantic lists them in an error): adding a method, regime, structure, state
# format or dtype there offers it here.
MethodName = Literal[tuple(METHODS)]
RegimeName = Literal[tuple(REGIMES)]
StructureName = Literal[STRUCTURES]
StateFormat = Literal[tuple(CODECS)]
HessianFormat = Literal[tuple(HESSIAN_CODECS)]
DtypeName = Literal[tuple(DTYPES)]

DEMO_CONFIG = shipped("configs/demo.yaml")
BENCH_CONFIG = shipped("configs/bench.yaml")


class Calibration(Strict):
    nsamples: int = Field(64, gt=0, description="calibration sequences per domain")
    seqlen: int = Field(256, gt=1, description="tokens per calibration sequence")
    seed: int = 0
    batch_size: int = Field(8, gt=0, description="sequences per forward pass")


class Evaluation(Strict):
    seqlen: int = Field(256, gt=1)
    max_tokens: int = Field(65536, gt=1, description="evaluation tokens per domain (a prefix)")
    batch_size: int = Field(8, gt=0)
    # "seen": after each step only the domains its lineage has calibrated on (the
    # PPL matrix's lower triangle, all that BWT and average PPL use); "all" also
    # measures the domains still to come.
    domains: Literal["all", "seen"] = "all"
    # lm-evaluation-harness tasks (copal.lm_eval_tasks) measured after each step and on the
    # dense model; empty: perplexity only. task_limit: the first N items of each.
    tasks: list[str] = []
    task_limit: int | None = Field(None, gt=0)
    task_include_path: str | None = Field(None, description="a folder of task YAMLs (lm-eval's include path)")


class StateOptions(Strict):
    """How a step stores the accumulate regime's statistic (a name of copal.codecs.CODECS):
    `log6L` (default), C ≈ row × column × one of 6 levels per weight (8/3 bits),
    with the bit-packed mask ≈ 0.235× the fp16 bytes of the prunable weights;
    `log8`/`log4`/`log3` the same with 2^8/16/8 levels; `bfloat16`; `float32`
    (2.06×, what runs stored before). Applies to a lineage's first step: later
    steps keep their parent's format (docs/DESIGN-NOTES.md).

    `hessian`: how an accumulated Hessian (COPAL's default sensitivity, SparseGPT's) is
    stored, once per distinct layer input: `sym16z` (default), `sym16` losslessly
    deflated (0.87x its bytes on SmolLM2; copal.codecs.SymmetricHalf16Zip), `sym16`, its
    symmetric half in float16 with a scale (copal.codecs.SymmetricHalf16; the step
    prunes with what it stores, the same in both), or `float32` (what runs stored before). A step whose weights a method
    reconstructs from its accumulated state stores no weights: they are recomputed
    from W0, the mask and the state wherever they are read."""

    format: StateFormat = "log6L"
    hessian: HessianFormat = "sym16z"


class RunConfig(Strict):
    name: str = "run"
    model: str
    domains: list[str] = Field(min_length=1)
    method: MethodName = "copal"
    regime: RegimeName = "accumulate"
    structure: StructureName = "unstructured"
    sparsity: float = 0.5
    mask_scope: Literal["row", "layer"] = "row"
    # How the sparsity is spread over the layers: `uniform`, each at `sparsity`; `owl`, OWL's
    # outlier-weighted allocation from the accumulated Σx² (copal.profiles, the `owl:` section),
    # the model's average still exactly `sparsity`. Unstructured only.
    sparsity_profile: Literal["uniform", "owl"] = "uniform"
    owl: OWLOptions = OWLOptions()
    calibration: Calibration = Calibration()
    evaluation: Evaluation = Evaluation()
    device: str = "auto"
    dtype: DtypeName = "float32"
    trust_remote_code: bool = False
    copal: CopalOptions = CopalOptions()
    sparsegpt: SparseGPTOptions = SparseGPTOptions()
    wanda: RefitOptions = RefitOptions()
    magnitude: RefitOptions = RefitOptions()
    state: StateOptions = StateOptions()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not is_safe_name(value):
            raise ValueError(f"{value[:80]!r} is not a valid name ({NAME_RULE})")
        return value

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, value: float) -> float:
        if not 0.0 < value < 1.0:
            raise ValueError(f"must be strictly between 0 and 1, got {value}")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
            return value
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {value!r}")

    @field_validator("sparsegpt")
    @classmethod
    def _blocks_hold_whole_groups(cls, value: SparseGPTOptions, info: ValidationInfo) -> SparseGPTOptions:
        """SparseGPT chooses N:M groups inside a block: a block that is not a whole
        number of groups would split a group across two blocks and break the pattern."""
        structure = info.data.get("structure", "unstructured")
        n_m = parse_structure(structure)
        if n_m is not None:
            m = n_m[1]
            if value.blocksize % m:
                raise ValueError(f"blocksize {value.blocksize} is not a multiple of {m}: structure {structure} "
                                 f"needs whole groups of {m} columns in each block")
        return value

    @model_validator(mode="after")
    def _structure_fits_sparsity(self) -> "RunConfig":
        nm = self.n_m
        if nm is not None:
            n, m = nm
            if abs(self.sparsity - (1 - n / m)) > 1e-9:
                raise ValueError(
                    f"structure {self.structure} means sparsity {1 - n / m:g}, but sparsity is {self.sparsity:g}"
                )
        return self

    @model_validator(mode="after")
    def _profile_fits(self) -> "RunConfig":
        if self.sparsity_profile == "owl":
            try:
                check_structure(Structure(self.sparsity, self.n_m))
                check_options(self.sparsity, self.owl.lam, self.owl.m)
            except InputError as error:
                raise ValueError(str(error)) from None
        return self

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_structure(self.structure)


def format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{source}: {where}: {message}"


def build_config(raw: dict, source: str = "config") -> RunConfig:
    """Validate a parsed config; any problem becomes one InputError line."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise InputError(format_validation_error(error, source)) from None


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 integers, which YAML 1.2 dropped:
    unquoted `2:4` is the N:M structure, not the integer 124."""


_ConfigLoader.yaml_implicit_resolvers = {first: list(resolvers) for first, resolvers
                                         in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _digit in "0123456789":
    _ConfigLoader.yaml_implicit_resolvers[_digit].insert(0, ("tag:yaml.org,2002:str", re.compile(r"^[0-9]+:[0-9]+$")))


def load_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `key=value` / `a.b=value` overrides; values are parsed as YAML."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected key=value")
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        node[leaf] = load_yaml(value)
    return raw


def read_config_file(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise InputError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a config must be a YAML mapping")
    return raw


def load_raw(path: Path | None, overrides: list[str] = (), default: Path = DEMO_CONFIG) -> dict:
    """A config file (default: `default`) as a mapping, `key=value` overrides applied, not yet
    validated. A shipped default's relative model path is the shipped model wherever you run it."""
    raw = read_config_file(path or default)
    if path is None and not Path(raw.get("model", "")).is_absolute():
        raw["model"] = str(shipped(raw["model"]))
    return apply_overrides(raw, list(overrides))


def load_run_raw(path: Path | None, overrides: list[str] = (), default: Path = DEMO_CONFIG) -> dict:
    """load_raw for a run: a bench config's `grid:` section (what `copal bench` runs) is
    not part of a run, so `copal run configs/smollm2.yaml` runs its base config."""
    raw = load_raw(path, overrides, default)
    raw.pop("grid", None)
    return raw


def load_config(path: Path | None, overrides: list[str] = (), default: Path = DEMO_CONFIG) -> RunConfig:
    """A config file (default: the demo config) with `key=value` overrides applied, validated."""
    return build_config(load_run_raw(path, overrides, default), str(path or default))
