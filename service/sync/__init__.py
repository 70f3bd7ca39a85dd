"""The pricing sync: price sources and the job that runs them under a lease."""
