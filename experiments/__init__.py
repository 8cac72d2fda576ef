"""Experiments around gpart_ds, kept apart from the library that users import:

    assets.py                         the name the study uses for gpart_ds/assets/ (the recipes that
                                      build the bundled model and data live in the package: the
                                      entry point runs a config's `prepare:`)
    bench/                            speed and memory benchmarks (`python -m experiments.bench`)
    study.py                          the quality study (`python -m experiments.study`)

They use gpart_ds's public pieces (config, trainer through the launcher, methods); the
library never imports them.
"""
