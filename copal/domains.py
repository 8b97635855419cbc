"""The domains of one run: each ingested once, checked, and tokenized once.

A domain's name must be unique within a run, and its data must be what the
run recorded (its fingerprint), else a later step would silently compare PPLs
on other text. Calibration samples and evaluation windows are cut on first use
and kept, and cut on adding a domain, so that a too-short domain fails when it
is added, not after hours of work. Every window starts with the tokenizer's
start tokens (its BOS, if it adds one: copal.tokens), unless told otherwise
(a replay of a step recorded under another convention).
"""

from pathlib import Path

import torch

from copal.config import RunConfig
from copal.data import Domain, ingest
from copal.sources import parse_source
from copal.windows import calibration_samples, evaluation_windows
from copal.errors import InputError
from copal.names import safe_example
from copal.tokens import TextStart, text_start


class RunDomains:
    """The run's domains in order; `fingerprints` holds what the run recorded."""

    def __init__(self, config: RunConfig, tokenizer, fingerprints: dict[str, str] | None = None,
                 data_dir: Path | None = None, start: TextStart | None = None):
        self.config = config
        self.tokenizer = tokenizer
        self.start = text_start(tokenizer) if start is None else start
        self.recorded = dict(fingerprints or {})
        self.data_dir = data_dir
        self.domains: list[Domain] = []
        self._samples: dict[str, torch.Tensor] = {}
        self._windows: dict[str, torch.Tensor] = {}

    def __iter__(self):
        return iter(self.domains)

    def __len__(self) -> int:
        return len(self.domains)

    def __getitem__(self, index: int) -> Domain:
        return self.domains[index]

    def fingerprints(self) -> dict[str, str]:
        return {domain.name: domain.fingerprint for domain in self.domains}

    def add(self, spec: str) -> Domain:
        name = parse_source(spec).name
        if any(known.name == name for known in self.domains):
            body = spec.removeprefix(f"{name}=")
            raise InputError(f"{spec}: another domain is already named {name!r}; name it, e.g. "
                             f"{safe_example(name + '-2')}={body}")
        domain = ingest(spec, self.data_dir)
        recorded = self.recorded.get(domain.name)
        if recorded is not None and recorded != domain.fingerprint:
            raise InputError(f"{spec}: data changed since the run recorded it "
                             f"(fingerprint {domain.fingerprint}, recorded {recorded})")
        self.samples(domain)
        self.windows(domain)
        self.domains.append(domain)
        return domain

    def index(self, spec: str) -> int | None:
        """Position of the domain `spec` names, None if the run does not have it."""
        return next((i for i, domain in enumerate(self.domains) if domain.source.spec == spec), None)

    def named(self, names) -> list[Domain]:
        """The domains with these names, in run order."""
        names = set(names)
        return [domain for domain in self.domains if domain.name in names]

    def samples(self, domain: Domain) -> torch.Tensor:
        """Calibration sequences (nsamples, seqlen) of `domain`."""
        if domain.name not in self._samples:
            cal = self.config.calibration
            self._samples[domain.name] = calibration_samples(domain, self.tokenizer, cal.nsamples, cal.seqlen,
                                                             cal.seed, self.start)
        return self._samples[domain.name]

    def windows(self, domain: Domain) -> torch.Tensor:
        """Evaluation windows (count, seqlen) of `domain`."""
        if domain.name not in self._windows:
            ev = self.config.evaluation
            self._windows[domain.name] = evaluation_windows(domain, self.tokenizer, ev.seqlen, ev.max_tokens,
                                                          self.start)
        return self._windows[domain.name]
