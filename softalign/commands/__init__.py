"""The command-line programs that load models: ``softalign encode`` and ``softalign eval``
(:mod:`softalign.commands.encode`, :mod:`softalign.commands.eval`), the model loading they share
(:mod:`softalign.commands.encoders`) and the universal report on a model (:mod:`softalign.commands.universal`).
Only this package imports across :mod:`softalign.train` and :mod:`softalign.eval`."""
