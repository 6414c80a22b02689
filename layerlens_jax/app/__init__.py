"""The LayerLens application: the end-to-end job behind the ``layerlens`` command.

It sits on top of the library core (:mod:`layerlens_jax`) and is the only part that needs the
application extras (``pip install "layerlens-jax[app]"``: tokenizer, safetensors, matplotlib):

* :mod:`~layerlens_jax.app.config` -- the strict TOML run configuration;
* :mod:`~layerlens_jax.app.data` -- task data sets (shipped assets) and batching;
* :mod:`~layerlens_jax.app.pretrained` -- the pretrained MiniLM encoder and its tokenizer;
* :mod:`~layerlens_jax.app.pipeline` -- the job's stages: prepare, profile, allocate, train, evaluate;
* :mod:`~layerlens_jax.app.report` -- Markdown report and plots of a run directory;
* :mod:`~layerlens_jax.app.cli` -- the ``layerlens`` command line.

The core never imports this package.
"""
