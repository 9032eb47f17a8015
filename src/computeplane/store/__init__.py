"""Persistence: the database engine and sessions, the ORM models and the migrations."""
