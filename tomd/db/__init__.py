"""Database: tables (models), the SQL (repository), migrations (migrate)."""
