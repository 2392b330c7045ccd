"""The command-line programs: ``softalign cache`` (:mod:`softalign.commands.cache`), ``softalign train``
(:mod:`softalign.commands.train`), ``softalign encode`` and ``softalign eval`` (:mod:`softalign.commands.encode`,
:mod:`softalign.commands.eval`), the model loading they share (:mod:`softalign.commands.encoders`) and the universal
report on a model (:mod:`softalign.commands.universal`); ``softalign demo`` is :mod:`softalign.train.demo`. Only this
package imports across :mod:`softalign.train` and :mod:`softalign.eval`; building the parsers imports no torch."""
