"""
How long a plan's trials will take, for the dry run: from the measured wall times of earlier
trials with the same config (under the results folder, at any depth, and in the benchmark
figures file), else from their measured time per step and per evaluation at the same model
size and batch, scaled to the config's iteration counts. Times only, never a result; each
trial is matched on its own config (a grid design's cells differ).
"""
import glob
import json
import math
import os

from config import Config, n_evaluations
from fileio import PROJECT_DIR

BENCH_FIGURES = os.path.join(PROJECT_DIR, 'benchmarks', 'bench_sweep.json')

# do not change how long a trial takes (the learning rate: a grid's cells share their times)
_NOT_TIMING = ('seed_base', 'eval_seed', 'dataset', 'learning_rate')
# what sets the time of one step and of one loss-estimate batch; the other fields (iteration
# counts, evaluation settings, the learning-rate recipe, seeds) change how many there are, or nothing
_STEP_COST = ('n_layer', 'n_embd', 'n_head', 'block_size', 'dropout', 'bias', 'vocab_size', 'n_experts', 'top_k',
              'capacity_factor', 'moe_every', 'hidden', 'depth', 'n_inputs', 'batch_size', 'grad_accum_steps',
              'gated_width')


# a field added to Config after a figure was measured: that trial ran at the field's default
_DEFAULTS = Config().to_dict()


def _timing_key(config_dict, unknown=()):
    full = {**_DEFAULTS, **config_dict}
    return json.dumps({k: v for k, v in sorted(full.items()) if k not in _NOT_TIMING + tuple(unknown)})


def _cost_key(config_dict, unknown=()):
    full = {**_DEFAULTS, **config_dict}
    return json.dumps({k: full.get(k) for k in _STEP_COST if k not in unknown})


def _earlier_times(results_dir):
    """Measured trials under results_dir (every study, at any depth: a grid design's cells are
    study folders inside its study) and in the benchmark figures file: dicts of model,
    activation, config, total_time, threads, where, and for trial JSONs the split of that
    time (training_time, eval_time, iters, evals)."""
    found = []
    for path in glob.glob(os.path.join(results_dir, '**', 'trial_*.json'), recursive=True):
        try:
            with open(path) as f:
                rec = json.load(f)
            m = rec['metrics']
            if rec.get('source') != 'measured' or not math.isfinite(m['total_time']):
                continue
            found.append({'model': rec['model'], 'activation': rec['activation'], 'config': rec['config'],
                          'total_time': float(m['total_time']), 'threads': rec.get('provenance', {}).get('threads'),
                          'where': os.path.dirname(os.path.dirname(os.path.dirname(path))),
                          'training_time': m.get('training_time'), 'eval_time': m.get('eval_time'),
                          'iters': m.get('iters'), 'evals': len((rec.get('history') or {}).get('iter') or [])})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    try:
        with open(BENCH_FIGURES) as f:
            for t in json.load(f).get('trials', []):
                if math.isfinite(t['total_time']):
                    found.append({'model': t['model'], 'activation': t['activation'], 'config': t['config'],
                                  'total_time': float(t['total_time']), 'threads': t.get('threads'),
                                  'where': show_path(BENCH_FIGURES), 'training_time': t.get('training_time'),
                                  'eval_time': t.get('eval_time'), 'iters': t.get('iters'), 'evals': t.get('evals')})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return found


def _scaled_time(f, config):
    """An earlier trial's all-in time carried over to `config` (same model size and batch,
    other iteration counts): its measured seconds per step and per loss-estimate batch times
    this config's counts, plus its time outside the training loop. None where the record
    lacks the split."""
    try:
        steps = (f['training_time'] - f['eval_time']) / f['iters']
        per_batch = f['eval_time'] / (f['evals'] * f['config']['eval_iters'])
        outside = f['total_time'] - f['training_time']
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return steps * config.max_iters + per_batch * config.eval_iters * n_evaluations(config) + outside


def _pools(found, config, threads):
    """The earlier figures usable for a trial of `config`: [(label, figures, whether they ran
    at this sweep's thread count)], 'exact' (same config) then 'scaled' (same model size and
    batch, other counts)."""
    # a dry run without saved trials does not know the sizes the data fixes: match on the rest
    unknown = [k for k in ('vocab_size', 'n_inputs') if not getattr(config, k)]
    key, cost = _timing_key(config.to_dict(), unknown), _cost_key(config.to_dict(), unknown)
    pools = []
    for label, same in (('exact', lambda f: _timing_key(f['config'], unknown) == key),
                        ('scaled', lambda f: _timing_key(f['config'], unknown) != key
                         and _cost_key(f['config'], unknown) == cost and _scaled_time(f, config))):
        match = [f for f in found if same(f)]
        same_threads = [f for f in match if f['threads'] == threads]
        pools.append((label, same_threads or match, bool(same_threads) or not match))
    return pools


def estimate(plan):
    """(per-trial seconds or None for each trial to run, a sentence saying where they come
    from, a sentence saying what is missing or None). Times only: measured wall times of
    earlier trials, or their measured time per step and per evaluation at this model size and
    batch scaled to this config's iteration counts; never a result. Each trial is matched on
    its own config (plan.full_config: a grid design's cells differ)."""
    found = _earlier_times(plan.results_dir)
    by_config, used_by_label = {}, {'exact': ({}, []), 'scaled': ({}, [])}
    per, counts = [], {'pair': 0, 'model': 0}
    for j in plan.to_run:
        config = plan.full_config(j)
        ckey = _timing_key(config.to_dict())  # what the figures are matched on
        if ckey not in by_config:
            by_config[ckey] = _pools(found, config, plan.threads)
            for label, used, threads_match in by_config[ckey]:
                used_by_label[label][0].update((id(f), f) for f in used)
                used_by_label[label][1].append(threads_match)
        t = None
        for label, used, _ in by_config[ckey]:
            for level, keep in (('pair', lambda f: (f['model'], f['activation']) == (j.model, j.activation)),
                                ('model', lambda f: f['model'] == j.model)):
                ts = [f['total_time'] if label == 'exact' else _scaled_time(f, config) for f in used if keep(f)]
                if ts and t is None:
                    t = sum(ts) / len(ts)
                    counts[level] += 1
        per.append(t)
    parts = []
    for label, (used, threads_match) in used_by_label.items():
        if not used:
            continue
        wheres = sorted({f['where'] for f in used.values()})
        if len(wheres) > 3:  # a grid design's cells: name their common folder
            try:
                wheres = [f"{len(wheres)} folders under {os.path.commonpath(wheres)}"]
            except ValueError:  # relative and absolute paths mixed
                wheres = [f"{len(wheres)} folders"]
        threads = '/'.join(sorted({str(f['threads']) for f in used.values()}))
        what = ("mean all-in time of {n} earlier trial(s) with the same config" if label == 'exact' else
                "{n} earlier trial(s) of the same model size and batch but other iteration or evaluation "
                "counts, scaled by their measured time per step and per evaluation")
        parts.append(what.format(n=len(used)) + f" in {', '.join(wheres)}, measured with {threads} thread(s) "
                     f"per trial" + ('' if all(threads_match) else f" (this sweep: {plan.threads})"))
    n_missing = sum(p is None for p in per)
    missing = None
    if n_missing:
        models = sorted({j.model for j, p in zip(plan.to_run, per) if p is None})
        missing = (f"{n_missing} trial(s) to run ({', '.join(models)}) have no figure: no earlier measured trial "
                   f"of {'that model' if len(models) == 1 else 'those models'} at this size and batch in "
                   f"{plan.results_dir} or {show_path(BENCH_FIGURES)} (train one trial of each first, or run "
                   f"benchmarks/bench_sweep.py)")
    source = '; '.join(parts) + (f"; {counts['pair']} trial(s) from the same model and activation, "
                                 f"{counts['model']} from the same model only"
                                 + (f", {n_missing} with no figure (not counted)" if n_missing else ''))
    return per, source, missing


def show_path(path):
    """A path for messages: relative where it lies below the current folder."""
    rel = os.path.relpath(path)
    return path if rel.startswith('..') else rel
