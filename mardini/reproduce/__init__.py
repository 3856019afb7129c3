"""``make reproduce``: toy-scale versions of the paper's analyses (Table 2, Fig. 6a, Fig. 6c, Table 3), see main."""
