"""The layout: every import between project modules points down (no cycle), sits at the top
of its module (none inside a function, where it would dodge a cycle), and the analysis side
never reaches torch. Read from the source with ast: nothing is imported."""
import ast
import glob
import os

import pytest

from conftest import ROOT

TORCH_FREE = ('analyze_results', 'stat_settings', 'pairwise', 'intervals', 'stat_tests', 'snapshot_stats', 'best_of_k', 'plot_utils', 'routing_metrics', 'activation_names', 'fileio', 'sanity', 'report',
              'store', 'config', 'cli', 'run_info', 'ffn_report', 'run_all_experiments', 'model_names', 'comparisons',
              'over_training', 'ffn_plots')


def project_modules():
    """{module name: path} of the top-level modules and of benchmarks/ (run with it on sys.path)."""
    paths = glob.glob(os.path.join(ROOT, '*.py')) + glob.glob(os.path.join(ROOT, 'benchmarks', '*.py'))
    return {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(paths)}


def _is_main_guard(node):
    """`if __name__ == '__main__':`"""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == '__name__'
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == '__main__')


def imports(source):
    """(top-level, deferred) imported top-level package names of a module's source. Deferred:
    inside a function body or under `if __name__ == '__main__':` (run later, so they could hide
    a cycle); everything else (try/except, class bodies, other ifs) runs on import."""
    top, deferred = [], []

    def names(node):
        if isinstance(node, ast.Import):
            return [a.name.split('.')[0] for a in node.names]
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            return [node.module.split('.')[0]]
        return []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            late = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) \
                or _is_main_guard(child)
            (deferred if late else top).extend((n, child.lineno) for n in names(child))
            visit(child, late)
    visit(ast.parse(source), False)
    return top, deferred


def graph(modules):
    """{module: {project modules it imports on import}} and {module: [(deferred project import, line)]}."""
    edges, deferred = {}, {}
    for name, path in modules.items():
        with open(path, encoding='utf-8') as f:
            top, late = imports(f.read())
        edges[name] = {n for n, _ in top if n in modules}
        deferred[name] = [(n, line) for n, line in late if n in modules]
    return edges, deferred


def find_cycles(edges):
    """Every strongly connected component with a cycle (a self-import included), as sorted lists."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(sorted(comp))
    for v in sorted(edges):
        if v not in index:
            connect(v)
    return sorted(out)


def reaches(edges, start):
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


MODULES = project_modules()
EDGES, DEFERRED = graph(MODULES)


# ----------------------------------------------------------------------------- the checks can fail

def test_cycle_finder_finds_cycles():
    assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
    assert find_cycles({'a': {'a'}, 'b': set()}) == [['a']]
    assert find_cycles({'a': {'b', 'c'}, 'b': {'c'}, 'c': set()}) == []


def test_import_reader_sees_deferred_and_top_level_imports():
    src = ("import os, config\nfrom train import run_trial\ntry:\n    import ray\nexcept ImportError:\n    ray = None\n"
           "def f():\n    import metrics\n    from model import GPT\n"
           "class C:\n    def g(self):\n        import sweep\n"
           "if __name__ == '__main__':\n    import mnist\n")
    top, late = imports(src)
    assert [n for n, _ in top] == ['os', 'config', 'train', 'ray']
    assert [n for n, _ in late] == ['metrics', 'model', 'sweep', 'mnist']
    with_cycle = {'x': 'import y\n', 'y': 'def f():\n    import x\n'}
    assert find_cycles({m: {n for n, _ in imports(s)[0] + imports(s)[1]} for m, s in with_cycle.items()}) \
        == [['x', 'y']]


# ----------------------------------------------------------------------------- the project

def test_the_project_modules_are_found():
    assert {'train', 'model', 'config', 'fileio', 'sweep', 'run_all_experiments', 'bench_sweep'} <= set(MODULES)
    assert EDGES['train'] >= {'config', 'fileio', 'model_factories', 'prepare_data'}


def test_no_import_cycles():
    # deferred imports are forbidden below, so the top-level graph is the whole graph
    assert find_cycles(EDGES) == []


# Deferred on purpose, for start-up time (--help without torch: issue 20), never to dodge a
# cycle: these edges count in the cycle check below too.
STARTUP_DEFERRED = {'run_all_experiments': {'run_study'}}


@pytest.mark.parametrize('module', MODULES)
def test_no_project_import_inside_a_function(module):
    """The rule: no imports inside functions (or a __main__ block) to dodge a cycle."""
    late = [(n, line) for n, line in DEFERRED[module] if n not in STARTUP_DEFERRED.get(module, ())]
    assert late == [], f"{module}.py imports project modules late: {late}"


def test_startup_deferred_imports_hide_no_cycle():
    edges = {m: set(e) | STARTUP_DEFERRED.get(m, set()) for m, e in EDGES.items()}
    assert find_cycles(edges) == []


def test_sweep_engine_does_not_import_the_command_line():
    assert 'run_all_experiments' not in reaches(EDGES, 'sweep')


def test_data_layer_imports_nothing_above_it():
    assert reaches(EDGES, 'fileio') == set()
    assert reaches(EDGES, 'mnist') == {'fileio', 'config', 'config_full_gpu'}
    assert reaches(EDGES, 'config') == {'config_full_gpu'} and reaches(EDGES, 'config_full_gpu') == set()


def test_the_store_sits_below_the_trainer_and_the_library_never_imports_a_study():
    """Trial records (store) below the trainer; the trainer (run_trial), models and data never
    reach the plan, the designs, the engine or the command lines (docs/design.md)."""
    assert reaches(EDGES, 'store') == {'config', 'config_full_gpu', 'fileio'}
    study = {'plan', 'designs', 'sweep', 'run_all_experiments', 'analyze_results', 'time_estimate'}
    for library in ('model_factories', 'prepare_data', 'checkpoint', 'trial_checks', 'device'):
        assert not study & reaches(EDGES, library), library
    assert not {'train', 'sweep', 'run_all_experiments'} & reaches(EDGES, 'plan')


@pytest.mark.parametrize('module', TORCH_FREE)
def test_analysis_side_never_reaches_torch(module):
    """Neither the module nor any project module it imports (transitively) imports torch."""
    for m in {module} | reaches(EDGES, module):
        with open(MODULES[m], encoding='utf-8') as f:
            top, late = imports(f.read())
        assert 'torch' not in [n for n, _ in top + late], f"{module} reaches torch through {m}.py"


def test_torch_check_sees_torch_where_it_is():
    # the check above can fail: the trainer reaches torch through the models
    assert 'model' in reaches(EDGES, 'train')
    with open(MODULES['model'], encoding='utf-8') as f:
        assert 'torch' in [n for n, _ in imports(f.read())[0]]
