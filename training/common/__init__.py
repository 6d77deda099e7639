"""The trainer skeleton shared by the STD and SiD-LSG methods: config, models, data, loop, checkpoints, export."""
