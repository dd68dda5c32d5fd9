"""The data: dataset registry, preparation, the stateless data order and tf.data pipelines."""
