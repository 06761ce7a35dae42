"""
The model names, in plain Python (no torch), like activation_names.py: so that a command line
can list them and answer --help or a usage error before torch is loaded. model_factories.py
builds its registry from model.py and moe.py and checks it against these at import.
"""

LANGUAGE_MODELS = ('charlm', 'tinylstm', 'minigpt', 'convlm', 'hybridlm', 'nanotransformer', 'switchlm')
CLASSIFIERS = ('ffn',)  # classifiers of flat inputs (mnist / mnist1d tasks)
ALL_MODELS = LANGUAGE_MODELS + CLASSIFIERS
