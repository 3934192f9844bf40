"""Reference benchmark: one Flower 1.42 SecAgg+ round in one process, no network.

Run it with the Flower venv's python (``bash bench/flower_env.sh`` makes it), never with the
project's own .venv:

    bench/.flower-venv/bin/python bench/flower_ref.py --clients 10 --params 1000000 --dropout 0

All of the protocol is Flower's own code: each client is Flower's ``secaggplus_mod`` (the
ClientApp mod, with its real stage handlers, state records and checks) and the server is
Flower's ``SecAggPlusWorkflow`` called as a whole (setup, share keys, collect masked vectors,
unmask, then the strategy's ``aggregate_fit``; FedAvg as in Flower's legacy setup).  The only
glue here is an in-process ``Grid`` whose ``send_and_receive`` hands each message to the
destination node's mod by function call instead of over the network, and a "training" step
that returns the prepared update.  Dropouts (``--dropout F``) are lost after key sharing,
before the masked input, as in bench/secagg_bench.py: they never answer the
collect-masked-vectors message, so the server must rebuild their first secret keys and remove
their pairwise masks.

Timing: ``client_s`` is the time spent in a node's ``secaggplus_mod`` over the four stages,
less the time of the training step it calls; ``server_s`` is the workflow's own time (the
whole ``SecAggPlusWorkflow.__call__``, less the time spent inside the in-process grid, i.e.
in the clients and in copying messages). ``server_fedavg_s`` is the part of ``server_s`` in
FedAvg's ``aggregate_fit``, which the workflow runs on the unmasked aggregate.

Inputs are the ones bench/secagg_bench.py makes (same seed, float32 N(0, 0.05) vectors,
integer weights in [100, 5000)), and the result is checked against the plain weighted mean
of the survivors, within Flower's quantization error, before anything is printed.

Prints, last, one JSON line with impl, clients, params, dropout, client_s (median per
client), client_max_s, server_s, server_fedavg_s, total_s (all clients + server),
upload_bytes (one client's masked vector as Flower sends it: ``ndarray_to_bytes`` of the
weight factor and the int64 masked parameters), max_abs_err and err_bound (vs the plain
weighted mean), num_shares, threshold, wall_s and cpu_s (wall and process CPU time of the
whole workflow call, clients and glue included: cpu_s well below wall_s means the machine was
busy with other work during the run).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import time
from collections.abc import Iterable
from typing import cast

import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.logger import FLOWER_LOGGER
from flwr.supercore.task_identity import TaskIdentity

FLWR_VERSION = "1.42.0"
MAX_WEIGHT = 5000  # the largest weight secagg_bench.py draws (Flower's default is 1000.0)


class _Proxy(ClientProxy):
    """A handle the legacy strategy samples; the workflow only reads its ``node_id``."""

    def __init__(self, node_id: int) -> None:
        super().__init__(cid=str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class _Node:
    """One SuperNode: its persistent Context and a ClientApp made of ``secaggplus_mod``."""

    def __init__(self, node_id: int, update: np.ndarray, weight: int) -> None:
        self.node_id = node_id
        self.update = update
        self.weight = weight
        self.context = Context(run_id=1, node_id=node_id, node_config={}, state=RecordDict(),
                               run_config={})
        self.busy_s = 0.0  # time in secaggplus_mod, training step excluded
        self.upload_bytes = 0

    def _train(self, msg: Message, ctxt: Context) -> Message:
        """What the wrapped ClientApp returns: the local update as a FitRes (not timed)."""
        t0 = time.perf_counter()
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([self.update]),
                        self.weight, {})
        out = Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)
        self._train_s += time.perf_counter() - t0
        return out

    def handle(self, msg: Message) -> Message:
        self._train_s = 0.0
        t0 = time.perf_counter()
        reply = secaggplus_mod(msg, self.context, self._train)
        self.busy_s += time.perf_counter() - t0 - self._train_s
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        if Key.MASKED_PARAMETERS in configs:
            self.upload_bytes = sum(
                len(b) for b in cast(list[bytes], configs[Key.MASKED_PARAMETERS])
            )
        return reply


def _as_received(msg: Message) -> Message:
    """The message as the destination node would decode it: its own config records.

    Flower serializes every message on its way, so each node gets its own copy (the mod pops
    the stage key from the records it receives). Arrays are shared: the mod only reads them.
    """
    content = RecordDict()
    for name, record in msg.content.array_records.items():
        content.array_records[name] = record
    for name, record in msg.content.config_records.items():
        content.config_records[name] = ConfigRecord(
            {k: list(v) if isinstance(v, list) else v for k, v in record.items()}, False
        )
    for name, record in msg.content.metric_records.items():
        content.metric_records[name] = record
    return Message(content, msg.metadata.dst_node_id, msg.metadata.message_type,
                   group_id=msg.metadata.group_id)


class InProcessGrid:
    """The Grid the workflow talks to, with every node in this process.

    ``dropped`` nodes stop answering from the collect-masked-vectors stage on (after they
    shared their keys), like a node that fails during local training.
    """

    def __init__(self, nodes: dict[int, _Node], dropped: set[int]) -> None:
        self.nodes = nodes
        self.dropped = dropped
        self.inside_s = 0.0  # all time spent in here: clients and message copies
        self.run_id = 1

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        t0 = time.perf_counter()
        replies = []
        for msg in messages:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            nid = msg.metadata.dst_node_id
            if nid in self.dropped and configs[Key.STAGE] not in (Stage.SETUP, Stage.SHARE_KEYS):
                continue  # no reply: the workflow's timeout expired for this node
            replies.append(self.nodes[nid].handle(_as_received(msg)))
        self.inside_s += time.perf_counter() - t0
        return replies


class _TimedFedAvg(FedAvg):
    aggregate_s = 0.0
    calls = 0

    def aggregate_fit(self, server_round, results, failures):
        t0 = time.perf_counter()
        out = super().aggregate_fit(server_round, results, failures)
        self.aggregate_s += time.perf_counter() - t0
        self.calls += 1
        return out


def error_bound(weights: list[int], workflow: SecAggPlusWorkflow, max_abs: float) -> float:
    """Worst-case |Flower's mean - plain mean| for the survivors' weights.

    Each client quantizes ``x * q_i / T`` (``q_i = round(w_i / max_weight * T)``) with a
    stochastic rounding step of ``2 * clip / T``; the server divides the sum by ``sum(q_i)/T``.
    So the error is at most ``n * step * T / sum(q)`` from rounding, plus the effect of
    weighting by ``q_i`` instead of ``w_i``, plus float64 noise.
    """
    t = workflow.quantization_range
    q = np.array([round(w / workflow.max_weight * t) for w in weights], np.float64)
    step = 2 * workflow.clipping_range / t
    w = np.array(weights, np.float64)
    reweight = max_abs * float(np.abs(q / q.sum() - w / w.sum()).sum())
    return len(weights) * step * t / float(q.sum()) + reweight + 1e-9


def measure(clients: int, params: int, dropout: float, num_shares: float | int,
            threshold: int | float | None) -> dict:
    rng = np.random.default_rng(clients * 7 + params)  # as bench/secagg_bench.py
    updates = [rng.normal(0, 0.05, params).astype(np.float32) for _ in range(clients)]
    weights = [int(w) for w in rng.integers(100, 5000, clients)]
    lost = set(range(round(dropout * clients)))
    if threshold is None:
        threshold = clients // 2 + 1  # bench/secagg_bench.py's default: t = (k + 1) // 2 + 1

    ids = random.Random(clients).sample(range(1, 2**63), clients)  # Flower's random node IDs
    nodes = {nid: _Node(nid, updates[i], weights[i]) for i, nid in enumerate(ids)}
    grid = InProcessGrid(nodes, dropped={ids[i] for i in lost})

    # The server side as Flower's DefaultWorkflow leaves it before the fit workflow.
    manager = SimpleClientManager()
    for nid in ids:
        manager.register(_Proxy(nid))
    strategy = _TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                            min_available_clients=clients,
                            fit_metrics_aggregation_fn=lambda _: {})
    base = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(base, strategy=strategy, client_manager=manager)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {WorkflowKey.CURRENT_ROUND: 1}
    )
    context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        ndarrays_to_parameters([np.zeros(params, np.float32)]), keep_input=True
    )
    # Flower's defaults for clipping (8.0), quantization (2**22) and modulus (2**32) ranges.
    workflow = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                  max_weight=float(MAX_WEIGHT))

    cpu, wall = time.process_time(), time.perf_counter()
    workflow(grid, context)  # type: ignore[arg-type]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall

    assert strategy.calls == 1, "the SecAgg+ workflow halted before aggregation"
    result: NDArrays = parameters_to_ndarrays(compat.arrayrecord_to_parameters(
        context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
    ))
    keep = [i for i in range(clients) if i not in lost]
    plain = np.zeros(params, np.float64)
    for i in keep:
        plain += updates[i].astype(np.float64) * weights[i]
    plain /= sum(weights[i] for i in keep)
    max_abs = max(float(np.abs(updates[i]).max()) for i in keep)
    assert max_abs * MAX_WEIGHT / workflow.max_weight < workflow.clipping_range, "would clip"
    err = float(np.abs(result[0].astype(np.float64) - plain).max())
    bound = error_bound([weights[i] for i in keep], workflow, max_abs)
    assert result[0].shape == (params,) and err <= bound, (
        f"Flower's secure aggregate differs from the plain weighted mean: {err} > {bound}"
    )

    per_client = [node.busy_s for node in nodes.values()]
    server_s = wall - grid.inside_s
    return {
        "impl": "flower-1.42-secaggplus",
        "clients": clients,
        "params": params,
        "dropout": dropout,
        "client_s": round(statistics.median(per_client), 4),
        "client_max_s": round(max(per_client), 4),
        "server_s": round(server_s, 4),
        "server_fedavg_s": round(strategy.aggregate_s, 4),
        "total_s": round(sum(per_client) + server_s, 4),
        "upload_bytes": nodes[ids[keep[0]]].upload_bytes,
        "max_abs_err": err,
        "err_bound": bound,
        "num_shares": num_shares,
        "threshold": threshold,
        "wall_s": round(wall, 4),
        "cpu_s": round(cpu, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--params", type=int, default=1_000_000)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--num-shares", type=float, default=1.0,
                        help="SecAggPlusWorkflow num_shares: a float is a fraction of the "
                             "clients, an int a count (default 1.0: every client, the "
                             "complete graph, like secagg_bench.py's default k = n - 1)")
    parser.add_argument("--threshold", type=int, default=None,
                        help="reconstruction_threshold (default n // 2 + 1, like ours)")
    args = parser.parse_args()
    if flwr.__version__ != FLWR_VERSION:
        raise SystemExit(f"flwr {flwr.__version__} found, {FLWR_VERSION} wanted: "
                         "run bash bench/flower_env.sh")
    FLOWER_LOGGER.setLevel(logging.WARNING)  # no per-stage INFO lines in the timing
    # The process identity Flower's runtimes set before a ServerApp runs (run_simulation.py
    # does the same for its legacy in-process API).
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    num_shares = int(args.num_shares) if args.num_shares > 1 else args.num_shares
    row = measure(args.clients, args.params, args.dropout, num_shares, args.threshold)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
