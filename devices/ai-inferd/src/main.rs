fn main() {
    eprintln!("ai-inferd: not wired yet");
    std::process::exit(1);
}
