"""Image conditioning: CLIP vision (unCLIP, IP-Adapter style) and the PhotoMaker ID encoder."""
