"""Prometheus text exposition for the server, written by hand (the format is a few lines).

Latency histograms and finish counters are updated by the engine thread; gauges (queue
lengths, KV blocks) come from a snapshot the engine thread publishes after each step, so
a scrape never touches the engine itself.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

# Seconds; TTFT includes queueing, so its buckets reach further than TPOT's.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative; summed when rendered
        self.count, self.sum = 0, 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self.counts[i] += 1
                    break
            self.count += 1
            self.sum += value

    def render(self) -> list[str]:
        with self._lock:
            lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
            cumulative = 0
            for bound, c in zip(self.buckets, self.counts):
                cumulative += c
                lines.append(f'{self.name}_bucket{{le="{bound}"}} {cumulative}')
            lines += [f'{self.name}_bucket{{le="+Inf"}} {self.count}',
                      f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Everything /metrics reports; `render` takes the engine's latest gauge snapshot."""

    def __init__(self) -> None:
        self.ttft = Histogram("ember_time_to_first_token_seconds",
                              "Seconds from arrival to the first generated token (queueing included).", TTFT_BUCKETS)
        self.tpot = Histogram("ember_time_per_output_token_seconds",
                              "Mean seconds between output tokens after the first, per request.", TPOT_BUCKETS)
        self.finished: Counter[str] = Counter()  # finish reason -> completions
        self.rejected = 0  # 429s for a full waiting queue

    def render(self, gauges: dict[str, Any]) -> str:
        def metric(name: str, kind: str, help: str, value: float) -> list[str]:
            return [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value}"]

        lines: list[str] = []
        lines += metric("ember_requests_running", "gauge", "Requests in the running batch.", gauges["running"])
        lines += metric("ember_requests_waiting", "gauge", "Requests queued, not yet started.", gauges["waiting"])
        lines += metric("ember_kv_blocks_used", "gauge", "KV-cache blocks held by sequences.", gauges["kv_used"])
        lines += metric("ember_kv_blocks_free", "gauge", "KV-cache blocks free or reusable.", gauges["kv_free"])
        lines += metric("ember_kv_blocks_total", "gauge", "KV-cache blocks in the pool.", gauges["kv_total"])
        lines += metric("ember_prefix_cache_hit_rate", "gauge", "Prompt blocks found in the prefix cache / looked up.",
                        gauges["hit_rate"])
        lines += self.ttft.render() + self.tpot.render()
        lines += metric("ember_generation_tokens_total", "counter", "Tokens generated.", gauges["generation_tokens"])
        lines += metric("ember_prompt_tokens_total", "counter", "Prompt tokens admitted (times n).",
                        gauges["prompt_tokens"])
        lines += metric("ember_preemptions_total", "counter", "Sequences preempted for lack of KV blocks.",
                        gauges["preemptions"])
        lines += metric("ember_spec_draft_tokens_total", "counter", "Speculative tokens proposed.",
                        gauges["spec_proposed"])
        lines += metric("ember_spec_accepted_tokens_total", "counter", "Speculative tokens the target accepted.",
                        gauges["spec_accepted"])
        lines += metric("ember_spec_acceptance_rate", "gauge", "Accepted / proposed speculative tokens.",
                        gauges["spec_acceptance_rate"])
        lines += metric("ember_spec_mean_accepted_length", "gauge",
                        "Tokens produced per verifying step (accepted guesses + 1).", gauges["spec_mean_accepted_length"])
        lines += metric("ember_requests_rejected_total", "counter", "Requests refused because the queue was full.",
                        self.rejected)
        lines += ["# HELP ember_requests_finished_total Completions finished, by reason (abort: client left).",
                  "# TYPE ember_requests_finished_total counter"]
        for reason in ("stop", "length", "abort"):
            lines.append(f'ember_requests_finished_total{{finish_reason="{reason}"}} {self.finished[reason]}')
        return "\n".join(lines) + "\n"
