"""Fisher merging's message protocol: its query, train extra and the records both halves use."""

FISHER_QUERY = "query.fisher"
FISHER_KEY = "fisher"  # ArrayRecord in train and query replies: parameter name -> diagonal F
FISHER_MODE = "fisher-mode"  # train/query config: asks for the Fisher (the train extra's key)
FISHER_EXAMPLES = "fisher-examples"  # config: at most this many examples per Fisher estimate
FISHER_BATCH_SIZE = "fisher-batch-size"  # config: examples per backward pass
