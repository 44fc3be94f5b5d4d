"""Looking at runs after the fact: what each expert learned (`specialization`,
`specialization_report`, `byte_classes`), plots of runs and routing (`plot`), and sweeps of
configs with their summaries (`sweep`)."""
