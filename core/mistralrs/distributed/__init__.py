"""Beyond one process: tensor parallelism on torch.distributed (docs/distributed.md).

`world` (who this process is, the groups, local workers, the MISTRALRS_MN_* mapping),
`sharding` (the model split per rank), `steps` (rank 0 broadcasts each step, the others follow),
`replicas` (data-parallel engine replicas behind one server).
"""
