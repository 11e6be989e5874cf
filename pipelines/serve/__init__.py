"""``fungi serve``: the features of new inputs online, and k-NN queries against a feature output.

A Ray Serve application (:mod:`pipelines.serve.app`) whose replicas each hold

* the batch job's own featurize stage, built from the spec and setup state the output records
  (:mod:`pipelines.serve.engine`): a request's items go through the job's decode and
  :class:`~pipelines.job.actor.FeaturizeActor`, so serving and the nightly table cannot drift;
* a faiss index of one committed version of the output (:mod:`pipelines.serve.index`),
  swapped whole for the next version when a night commits: every response names the one
  version it used;
* the request limits and JSON shapes (:mod:`pipelines.serve.api`): a bad request is a 4xx
  naming the field, never a 500.
"""
