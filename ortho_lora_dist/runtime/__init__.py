"""What every part of the application shares: process group and collectives, atomic files, progress, signals,
shipped files."""
