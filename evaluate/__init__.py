"""Evaluation of dhara models: lm-eval tasks in AR and diffusion mode, perplexity, divergence.

``scoring`` (log-likelihoods, no lm-eval needed), ``harness`` (the lm-eval adapter;
needs the ``eval`` extra), ``divergence`` (text-file perplexity and drift from a
reference, through ``optiq_dhara.metrics``), ``report`` (results files and tables).
"""
