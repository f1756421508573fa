"""Training pipelines, the model importer and the feature-store seeder for Tiffin."""
