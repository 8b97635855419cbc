"""What a replay found, and whether it verifies the recorded step.

A replay recomputes a step under the recorded thread count (copal.environment).
Same environment otherwise → the masks must be the recorded ones bit for bit.
Where a fact differs that pinning cannot undo (the torch build, BLAS, the CPU's
kernels, CUDA instead of the CPU, the dtype), floating-point sums come out in
another order, a few near-tied scores swap sides, and bit-identity is not a fair
test: the replay then verifies the step if every layer's mask agrees with the
record on at least `MIN_LAYER_AGREEMENT` of its weights and the step's own-domain
PPL is within `MAX_PPL_CHANGE` of the recorded one. Both bounds hold a margin over
the spread measured between CPU kernels (`benchmarks/replay_spread.py`,
docs/RESULTS.md "Replay across machines (issue 21)").
"""

from dataclasses import dataclass, field
from pathlib import Path

from copal.records import StepRecord
from copal.state import StepState

MIN_LAYER_AGREEMENT = 0.99
MAX_PPL_CHANGE = 0.01


@dataclass
class ReplayResult:
    step: int
    threads: int | None  # the recorded thread count the replay ran with (None: not recorded)
    facts: dict[str, tuple]  # environment facts other than threads that differ: {fact: (recorded, now)}
    agreement: dict[str, float]  # per layer: the share of mask bits equal to the record
    ppl: tuple[float, float] | None = None  # own-domain PPL (recorded, replayed), measured when masks differ
    domain: str = ""
    files: list[str] = field(default_factory=list)  # other step files (state, weights) whose bytes differ

    @property
    def differing(self) -> list[str]:
        """The layers whose masks are not the recorded ones bit for bit."""
        return [name for name, share in self.agreement.items() if share < 1.0]

    @property
    def ppl_change(self) -> float | None:
        if self.ppl is None:
            return None
        recorded, replayed = self.ppl
        return abs(replayed - recorded) / recorded

    @property
    def within_tolerance(self) -> bool:
        return (min(self.agreement.values(), default=1.0) >= MIN_LAYER_AGREEMENT
                and (self.ppl_change or 0.0) <= MAX_PPL_CHANGE)

    @property
    def verified(self) -> bool:
        """Bit-identical masks; or, in an environment that pinning cannot make the
        recorded one, agreement and PPL within the stated tolerance."""
        if not self.differing and (not self.files or self.facts):
            return True
        return bool(self.facts) and self.within_tolerance

    def lines(self) -> list[str]:
        """What the command prints: the verdict first, then the evidence."""
        pinned = f" with the recorded {self.threads} thread(s)" if self.threads else ""
        if not self.differing and not self.files:
            return [f"step {self.step}: replay reproduced the recorded masks, state and weights bit for bit{pinned}"]
        if not self.differing and self.facts:  # state bytes follow the arithmetic: only masks are judged
            return [f"step {self.step}: replay reproduced the recorded masks bit for bit{pinned} in another "
                    f"environment ({'; '.join(f'{k} {a} → {b}' for k, (a, b) in self.facts.items())})"]
        if not self.differing:
            head = f"step {self.step}: masks reproduced{pinned}, but these files differ from the record: "
            return [head + ", ".join(self.files[:5]) + (" …" if len(self.files) > 5 else "")]
        facts = "; ".join(f"{key} {old} → {new}" for key, (old, new) in self.facts.items())
        worst = sorted(self.agreement.items(), key=lambda item: item[1])
        changed = self.differing
        evidence = [f"mask agreement: lowest {worst[0][1]:.4%} ({worst[0][0]}), "
                    f"{len(changed)} of {len(self.agreement)} layer(s) not bit-identical"]
        evidence += [f"  {name}: {share:.4%}" for name, share in worst[: min(5, len(changed))]]
        if self.ppl is not None:
            evidence.append(f"PPL on {self.domain}: recorded {self.ppl[0]:.4f}, replayed {self.ppl[1]:.4f} "
                            f"({self.ppl_change:.3%} change)")
        tolerance = f"tolerance: every layer ≥ {MIN_LAYER_AGREEMENT:.0%} agreement, PPL within {MAX_PPL_CHANGE:.0%}"
        if not self.facts:
            head = (f"step {self.step}: masks differ from the record in {len(changed)} layer(s){pinned}, "
                    "in the recorded environment: the step is not reproduced")
        elif self.verified:
            head = (f"step {self.step}: reproduced within tolerance in another environment ({facts}); "
                    "bit-identity needs the recorded one")
        else:
            head = (f"step {self.step}: outside tolerance in another environment ({facts}): "
                    "the step is not reproduced")
        return [head, *evidence, tolerance]


def replay_step(session, step_id: int) -> ReplayResult:
    """Recompute a recorded step of `session` (copal.session.RunSession) from its parent
    and data, under its recorded thread count and tokenization; compare its masks with
    the record, layer by layer, its other files (state, weights) byte for byte, and
    where masks differ its own-domain PPL."""
    import tempfile

    from copal import lifecycle
    from copal.digests import tree_digests
    from copal.environment import differences, environment
    from copal.errors import InputError
    from copal.model import torch_threads
    from copal.tokens import TextStart

    state = session.dir.step(step_id)
    state.verify()
    record = state.record
    index = [d.name for d in session.domains].index(record.domain)
    domain = session.domains[index]
    if domain.fingerprint != record.fingerprint:
        raise InputError(f"{domain.source.spec}: data changed since step {step_id} "
                         f"(fingerprint {domain.fingerprint}, recorded {record.fingerprint})")
    recorded_files = record.files or tree_digests(state.folder)
    session.use_start(TextStart.from_record(record.tokenization))
    recorded_env = record.environment
    threads = recorded_env["threads"] if recorded_env else None
    facts = differences(recorded_env, environment(session.device, session.config.dtype))
    result = ReplayResult(step_id, threads, facts, {}, domain=record.domain)
    with tempfile.TemporaryDirectory() as scratch, torch_threads(threads):
        step = lifecycle.start_step(session, index, parent_id=record.parent, steps_dir=Path(scratch))
        if record.reweight is None:  # a step that stored its weights (recorded before they were recomputed)
            step.writer.recompute_weights(None)
        lifecycle.calibrate(session, step)
        lifecycle.prune(session, step)
        result.agreement = _mask_agreement(step.writer, state)
        replayed = step.writer.commit(StepRecord(step=step.step_id, parent=record.parent, domain=record.domain,
                                                 ppl={}))
        files = StepState(replayed).record.files
        result.files = [name for name in sorted(set(files) | set(recorded_files)) if name != "masks.safetensors"
                        and files.get(name) != recorded_files.get(name)]
        if result.differing and record.domain in record.ppl:
            ppl, _ = session.execution.perplexity(session.domains.windows(domain), session.device,
                                                  session.config.evaluation.batch_size)
            result.ppl = (record.ppl[record.domain], ppl)
    head_id = session.dir.head()
    if head_id:  # evaluations after this one see HEAD's weights again, not the replay's
        session.execution.holds_state(session.dir.step(head_id))
    return result


def _mask_agreement(writer, state) -> dict[str, float]:
    """Per layer: the share of the replayed mask's bits equal to the recorded mask's (0 where one lacks the layer)."""
    from copal import masks as maskio

    recorded = {name: state.mask(name) for name in state.mask_names()}
    agreement = {}
    for name in dict.fromkeys([*writer.packed_masks, *recorded]):
        packed = writer.packed_masks.get(name)
        if packed is None or name not in recorded:
            agreement[name] = 0.0
            continue
        mask = maskio.unpack(packed, recorded[name].shape)
        agreement[name] = float((mask == recorded[name]).double().mean())
    return agreement
